"""Real Ray Tune searches over real Ray Train runs on real digits (ray tier).

One ASHA search of 4 trials x 3 epochs (1 worker of half a CPU each, two trials at a time on
2 CPUs) on half the tiny preset's data carries most assertions; it costs two minutes on 2 CPUs.
"""

from __future__ import annotations

import csv
import json
import time

import pytest
from report_checks import check_report

from rayfine.checkpoints import INFERENCE_FILES, load_checkpoint
from rayfine.config import ConfigError, load_config
from rayfine.data import build_datasets
from rayfine.errors import TrainingError
from rayfine.evaluate import predict_dataset
from rayfine.tune import run_search

pytestmark = pytest.mark.ray

GOOD_LR, WEAK_LR = 3.0e-3, 1.0e-6


def read_trials(run_dir):
    with (run_dir / "tune" / "trials.csv").open() as f:
        return list(csv.DictReader(f))


def wait_for_all_cpus(ray, timeout_s=60.0) -> float:
    total = ray.cluster_resources()["CPU"]
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= total - 1e-6:
            break
        time.sleep(1)
    return ray.available_resources().get("CPU", 0)


def test_asha_stops_weak_trials_and_the_winner_loads_and_predicts(ray_local, tmp_path):
    # Two learning rates on a grid, one far too small to learn anything in an epoch, so that
    # ASHA has a weak trial to stop whatever order the trials report in; batch sizes are sampled.
    cfg = load_config("resnet18_digits_tiny", [
        "name=asha", f"storage.runs_dir={tmp_path}", "data.subsample=0.2",
        f"tune.search_space.train.lr={{grid: [{GOOD_LR}, {WEAK_LR}]}}",
        "tune.search_space.train.batch_size={choice: [16, 32]}",
        "tune.num_samples=2",
        f"tracking.mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
    ])
    messages: list[str] = []
    summary = run_search(cfg, log=messages.append)
    run = tmp_path / "asha"

    rows = read_trials(run)
    assert list(rows[0]) == ["trial_id", "train.lr", "train.batch_size", "epoch", "train_loss", "val_loss",
                             "val_accuracy", "val_macro_f1", "samples_per_s", "epoch_s", "status"]
    by_trial: dict[str, list[dict]] = {}
    for r in rows:
        by_trial.setdefault(r["trial_id"], []).append(r)
    assert len(by_trial) == 4
    assert sorted(float(rs[0]["train.lr"]) for rs in by_trial.values()) == [WEAK_LR, WEAK_LR, GOOD_LR, GOOD_LR]
    for trial_rows in by_trial.values():
        epochs = [int(r["epoch"]) for r in trial_rows]
        assert epochs == list(range(1, len(epochs) + 1))  # every epoch once, in order
        assert {r["status"] for r in trial_rows} == {"completed" if epochs[-1] == 3 else "stopped"}
        assert int(trial_rows[0]["train.batch_size"]) in (16, 32)

    stopped = [rs for rs in by_trial.values() if rs[0]["status"] == "stopped"]
    assert stopped, "ASHA stopped no trial"
    # What ASHA stopped was weak: at the rung (epoch) where it stopped, below what another trial
    # reached at that epoch (ASHA stops a result under the rung's top-1/reduction_factor cutoff).
    def at_epoch(trial_rows: list[dict], epoch: int):
        return next((float(r["val_accuracy"]) for r in trial_rows if int(r["epoch"]) == epoch), None)

    for rs in stopped:
        epoch, mine = int(rs[-1]["epoch"]), float(rs[-1]["val_accuracy"])
        others = [v for t in by_trial.values() if t is not rs and (v := at_epoch(t, epoch)) is not None]
        assert others and mine < max(others), (epoch, mine, others)
    assert any(rs[0]["status"] == "completed" for rs in by_trial.values())
    # Each stop was marked beside the trial's epoch log as ASHA took it, so that --resume keeps it.
    marked = {p.parent.name for p in (run / "ray" / "trials").glob("trial_*/stopped_by_asha.json")}
    assert marked == {f"trial_{t}" for t, rs in by_trial.items() if rs[0]["status"] == "stopped"}, marked

    written = json.loads((run / "tune" / "summary.json").read_text())
    assert written == summary
    assert written["num_trials"] == 4 and written["epochs_full_budget"] == 12
    assert written["epochs_run"] == len(rows) < 12
    assert written["wall_s"] > 0 and written["scheduler"] == "asha"

    # The winner: the best epoch of all trials, exported with its config and test evaluation.
    best = written["best"]
    top = max(rows, key=lambda r: float(r["val_accuracy"]))
    assert best["val_accuracy"] == pytest.approx(float(top["val_accuracy"]))
    assert best["trial_id"] == top["trial_id"] and best["overrides"]["train.lr"] == GOOD_LR
    best_dir = run / "tune" / "best"
    assert sorted(p.name for p in (best_dir / "checkpoint").iterdir()) == sorted(INFERENCE_FILES)
    ckpt = load_checkpoint(best_dir / "checkpoint")
    assert ckpt.metrics["val_accuracy"] == pytest.approx(best["val_accuracy"])
    assert ckpt.cfg.train.lr == GOOD_LR and ckpt.cfg.train.batch_size == best["overrides"]["train.batch_size"]

    # It predicts: the checkpoint alone reproduces the reported test accuracy, well above chance (0.1).
    report = json.loads((best_dir / "eval.json").read_text())
    assert report["split"] == "test" and report["accuracy"] == best["test_accuracy"] > 0.3
    datasets, _ = build_datasets(ckpt.cfg, log=lambda *_: None)
    y, probs = predict_dataset(ckpt, datasets["test"])
    assert len(y) == report["num_samples"] and (probs.argmax(1) == y).mean() == pytest.approx(report["accuracy"])

    # `rayfine train tune/best/config.yaml` reproduces the winner, in a run directory of its own.
    winner = load_config(best_dir / "config.yaml")
    assert winner.name == "asha-best" and winner.run_dir() == tmp_path / "asha-best"
    assert (winner.train.lr, winner.train.batch_size, winner.train.epochs, winner.scaling.num_workers) == (
        GOOD_LR, best["overrides"]["train.batch_size"], 3, 1)
    assert winner.model_copy(update={"name": "asha"}) == ckpt.cfg

    # The live output (plain lines: not a TTY) and the leaderboard.
    text = "\n".join(messages)
    assert "[tune] each trial: 0.76 CPUs" in text and "2 at a time" in text
    running, peak = set(), 0
    for m in messages:
        words = m.split()
        if m.startswith("[tune] ") and len(words) > 2 and words[2] == "started":
            running.add(words[1])
            peak = max(peak, len(running))
        elif m.startswith("[tune] ") and len(words) > 2 and words[2] in ("completed;", "stopped", "failed"):
            running.discard(words[1])
    assert peak == 2  # as planned: two trials at a time, never more
    assert "stopped early after epoch" in text and "completed" in text
    assert "[tune] leaderboard" in text and best["trial_id"] in text

    # The report: curves per trial (with where ASHA stopped them), the search view, the winner,
    # its test evaluation, the config; PNGs beside it.
    html = check_report(run / "tune" / "report.html", ["winner", "curves", "search", "evaluation", "config"], 3)
    assert best["trial_id"] in html and "train.lr" in html and "stopped" in html
    assert all((run / "tune" / name).is_file() for name in ("learning_curves.png", "search_overview.png"))

    # MLflow: one parent run for the search, a nested child per trial with a point per epoch it
    # ran; the parent holds the winner's test evaluation and checkpoint. TensorBoard events too.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("asha")
    mlflow_runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in mlflow_runs if r.data.tags.get("rayfine.kind") == "search"]
    children = [r for r in mlflow_runs if r.data.tags.get("rayfine.kind") == "trial"]
    assert len(parents) == 1 and len(children) == 4 and len(mlflow_runs) == 5
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert parent.info.status == "FINISHED" and parent.data.metrics["test_accuracy"] == best["test_accuracy"]
    assert parent.data.tags["rayfine.best_trial"] == best["trial_id"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "checkpoint")} >= {"checkpoint/model.safetensors"}
    for child in children:
        tid = child.data.tags["rayfine.trial_id"]
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == [int(r["epoch"]) for r in by_trial[tid]]
        assert child.data.params["train.lr"] == by_trial[tid][0]["train.lr"]
        assert child.info.status == "FINISHED"
        assert any((run / "tune" / "tensorboard" / tid).glob("events.out.tfevents.*"))

    # Trials that ASHA stopped released their workers' CPUs: everything is free again.
    assert wait_for_all_cpus(ray_local) == pytest.approx(ray_local.cluster_resources()["CPU"])
    # Every trial's workers read the shards split once on the search's driver: no split coordinator.
    from ray.util.state import list_actors

    assert list_actors(filters=[("class_name", "=", "SplitCoordinator")]) == []


def test_time_budget_ends_the_search(ray_local, tmp_path):
    # One second: Ray Train alone takes longer to start a worker group, so no trial gets an epoch in.
    cfg = load_config("resnet18_digits_tiny", ["name=budget", f"storage.runs_dir={tmp_path}", "tune.time_budget_s=1"])
    with pytest.raises(TrainingError, match="the search finished without a usable checkpoint"):
        run_search(cfg, log=lambda *_: None)
    rows = read_trials(tmp_path / "budget")
    assert rows and all(r["epoch"] == "" and r["status"] == "not started" for r in rows)
    summary = json.loads((tmp_path / "budget" / "tune" / "summary.json").read_text())
    assert summary["epochs_run"] == 0 and summary["best"] is None
    # The full budget is the search as configured, whether or not the budget let Tune create every trial.
    from rayfine.tune.plan import count_trials

    assert summary["trials_planned"] == count_trials(cfg.tune) >= summary["num_trials"] == len(rows)
    assert summary["epochs_full_budget"] == summary["trials_planned"] * summary["epochs_per_trial"]
    assert wait_for_all_cpus(ray_local) == pytest.approx(ray_local.cluster_resources()["CPU"])


def test_a_plan_that_cannot_fit_is_refused_before_any_trial(ray_local, tmp_path):
    # Trials with the preset's own 2 workers x 0.75 CPU + 0.5 for Ray Data + 0.01 for the trial
    # actor need 2.01 CPUs; this Ray has 2. Run as planned, the search would hang.
    cfg = load_config("resnet18_digits_tiny", ["name=toobig", f"storage.runs_dir={tmp_path}", "tune.trial_overrides=[]"])
    with pytest.raises(ConfigError) as info:
        run_search(cfg, log=lambda *_: None)
    message = str(info.value)
    assert "a trial needs 2.01 CPUs" in message and "the cluster has 2" in message
    assert "lower scaling.num_workers, scaling.cpus_per_worker or scaling.data_cpus" in message
    assert not (tmp_path / "toobig").exists()  # nothing started, nothing written


def test_a_search_that_fails_on_its_data_leaves_no_search_behind(ray_local, tmp_path, digits):
    # A data.label_column of one class passes preflight (the source exists, it is parquet, the
    # column is there) and fails in build_datasets: the corrected command must start the search, not
    # be refused as "a search of a different config", and --resume must not take the failed command
    # for a search.
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from rayfine.errors import DataError
    from rayfine.tune.search import preflight

    def png(image):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        return buf.getvalue()

    images, labels = digits
    pq.write_table(pa.table({"image": [png(x) for x in images[:40]], "label": labels[:40].tolist(), "lbl": [7] * 40}),
                   tmp_path / "digits.parquet")
    overrides = ["name=baddata", f"storage.runs_dir={tmp_path}", f"data.source={tmp_path / 'digits.parquet'}"]
    bad = load_config("resnet18_digits_tiny", [*overrides, "data.label_column=lbl"])
    fixed = load_config("resnet18_digits_tiny", overrides)
    with pytest.raises(DataError, match=r"need at least 2 labels to classify, found \['7'\]"):
        run_search(bad, log=lambda *_: None)
    marker = tmp_path / "baddata" / "tune" / "config.yaml"
    assert not marker.exists()
    preflight(fixed)  # accepted
    with pytest.raises(ConfigError, match="--resume: no search to resume"):
        preflight(fixed, resume=True)
    # A search killed before Tune saved anything left only its config: the same command runs again,
    # and failing before Tune saves, it removes that too. (A search that left outputs, or Tune state
    # under another storage.storage_path, is refused before anything is touched: test_tune_plan.)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(bad.to_yaml())
    with pytest.raises(DataError, match="need at least 2 labels"):
        run_search(bad, log=lambda *_: None)
    assert not marker.exists()
