"""rayfine.tracking without Ray: MLflow errors never end the work they track (one warning, then
MLflow is off and TensorBoard goes on), continued runs reuse an MLflow run only where it is, and
tracking.json is written whole."""

from __future__ import annotations

import json
import math
import shutil
import socket
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from rayfine.config import load_config

EPOCH = {"epoch": 1, "train_loss": 0.9, "val_loss": 0.8, "val_accuracy": 0.5, "val_macro_f1": 0.4,
         "samples_per_s": 100.0, "epoch_s": 1.0}
EVALUATION = {"split": "test", "accuracy": 0.5, "macro_f1": 0.4, "loss": 0.8}


@pytest.fixture(scope="module")
def _empty_db(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables made once (creating them takes seconds): each test copies it."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def sqlite_uri(tmp_path, _empty_db):
    """A fresh sqlite store's URI (call it with a name for a second one)."""
    def make(name: str = "mlflow.db") -> str:
        shutil.copy(_empty_db, tmp_path / name)
        return f"sqlite:///{tmp_path / name}"

    return make


@pytest.fixture
def unreachable(monkeypatch) -> str:
    """An MLflow server URI where nothing listens (a port just freed), tried once, not 7 times."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _cfg(tmp_path, uri: str, *more: str):
    return load_config("resnet18_digits_tiny", ["name=t", f"storage.runs_dir={tmp_path / 'runs'}",
                                                f"tracking.mlflow.tracking_uri={uri}", *more])


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars in the TensorBoard event files under ``logdir``: {tag: [(step, value)]}."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(logdir.rglob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("[tracking] warning")]


def _trial(tid: str):
    return SimpleNamespace(trial_id=tid, config={"train.lr": 0.01})


def test_unreachable_mlflow_server_warns_once_and_training_goes_on(tmp_path, unreachable, capsys):
    from mlflow.tracking import MlflowClient
    from tensorboardX import SummaryWriter

    from rayfine.tracking import RunTracker

    cfg = _cfg(tmp_path, unreachable)
    tracker = RunTracker.open(cfg, name="train", tensorboard_dir=tmp_path / "tb")
    for epoch in (1, 2):
        tracker.log_epoch({**EPOCH, "epoch": epoch})
    tracker.log_evaluation(EVALUATION)
    tracker.log_checkpoint(tmp_path)
    tracker.finish()
    (warning,) = _warnings(capsys)
    assert unreachable in warning and "off for the rest of this run" in warning and "training continues" in warning
    assert _scalars(tmp_path / "tb")["val_accuracy"] == [(1, 0.5), (2, 0.5)]
    assert _scalars(tmp_path / "tb")["test_accuracy"] == [(0, 0.5)]

    # A server that goes away after the run started: the same, from the first failing call on.
    writer = SummaryWriter(logdir=str(tmp_path / "tb2"))
    tracker = RunTracker(MlflowClient(tracking_uri=unreachable), "0" * 32, writer)
    tracker.log_epoch(EPOCH)
    tracker.log_evaluation(EVALUATION)
    # What driver.py does when training fails: its error, not MLflow's, is what comes out.
    with pytest.raises(RuntimeError, match="training failed"):
        try:
            raise RuntimeError("training failed")
        except BaseException:
            tracker.finish("FAILED")
            raise
    (warning,) = _warnings(capsys)
    assert unreachable in warning and "ending the run as FAILED" not in warning  # the first call turned it off
    assert _scalars(tmp_path / "tb2")["val_loss"] == [(1, pytest.approx(0.8))]


def test_unreachable_mlflow_server_does_not_end_a_search(tmp_path, unreachable, capsys):
    from rayfine.tracking import SearchTracking

    tracking = SearchTracking(_cfg(tmp_path, unreachable), ["train.lr"])
    a, b = _trial("a"), _trial("b")
    tracking.on_trial_start(0, [], a)
    tracking.on_trial_start(0, [], b)
    tracking.on_trial_result(0, [], a, dict(EPOCH))
    tracking.on_trial_result(0, [], b, dict(EPOCH))
    tracking.on_trial_complete(0, [], a)
    tracking.on_trial_error(0, [], b)
    summary = {"num_trials": 2, "epochs_run": 2, "epochs_full_budget": 2, "budget_fraction": 1.0, "wall_s": 1.0,
               "best": {"trial_id": "a", "val_accuracy": 0.5}}
    tracking.finish(summary, EVALUATION, tmp_path)
    assert len(_warnings(capsys)) == 1  # one for the search, not one per trial
    assert not tracking.state_path.exists()
    assert _scalars(tracking.tune_dir / "tensorboard" / "a")["val_accuracy"] == [(1, 0.5)]
    assert _scalars(tracking.tune_dir / "tensorboard" / "b")["val_accuracy"] == [(1, 0.5)]


def test_a_store_that_fails_mid_run_turns_mlflow_off(tmp_path, sqlite_uri, capsys):
    from mlflow.tracking import MlflowClient

    from rayfine.tracking import RunTracker, SearchTracking

    uri = sqlite_uri()
    client = MlflowClient(tracking_uri=uri)
    tracker = RunTracker.open(_cfg(tmp_path, uri), name="train", tensorboard_dir=tmp_path / "tb")
    tracker.log_epoch(EPOCH)
    client.delete_run(tracker.run_id)  # MLflow refuses to log into it from now on
    tracker.log_epoch({**EPOCH, "epoch": 2})
    tracker.log_evaluation(EVALUATION)
    tracker.finish()
    warning, ending = _warnings(capsys)  # a deleted run cannot be ended either: one more line, no error
    assert "logging epoch 2" in warning and uri in warning
    assert "ending the run as FINISHED failed" in ending
    assert [s for s, _ in _scalars(tmp_path / "tb")["val_accuracy"]] == [1, 2]
    assert [m.step for m in client.get_metric_history(tracker.run_id, "val_accuracy")] == [1]

    # A search: the parent is deleted while a trial runs.
    tracking = SearchTracking(_cfg(tmp_path, uri), ["train.lr"])
    a = _trial("a")
    tracking.on_trial_result(0, [], a, dict(EPOCH))
    client.delete_run(tracking.trials["a"].run_id)
    tracking.on_trial_result(0, [], a, {**EPOCH, "epoch": 2})
    tracking.on_trial_complete(0, [], a)
    tracking.finish(None, None, None, status="FAILED")
    assert len(_warnings(capsys)) == 2  # the trial's error, and its deleted run that cannot be ended
    assert [s for s, _ in _scalars(tracking.tune_dir / "tensorboard" / "a")["val_accuracy"]] == [1, 2]
    assert client.get_run(tracking.parent.run_id).info.status == "FAILED"  # the parent was ended all the same


def test_a_continued_run_starts_a_new_mlflow_run_when_its_old_one_is_elsewhere(tmp_path, sqlite_uri, capsys):
    from mlflow.tracking import MlflowClient

    from rayfine.tracking import RunTracker

    uri1, uri2 = sqlite_uri("one.db"), sqlite_uri("two.db")
    first = RunTracker.open(_cfg(tmp_path, uri1), name="train", tensorboard_dir=None)
    first.finish()

    same = RunTracker.open(_cfg(tmp_path, uri1), name="train", tensorboard_dir=None, run_id=first.run_id)
    assert same.run_id == first.run_id
    same.finish()

    # tracking.mlflow.tracking_uri changed: the old run is not in the new store.
    moved = RunTracker.open(_cfg(tmp_path, uri2), name="train", tensorboard_dir=None, run_id=first.run_id)
    moved.log_epoch(EPOCH)
    moved.finish()
    assert moved.run_id != first.run_id
    assert MlflowClient(tracking_uri=uri2).get_run(moved.run_id).data.metrics["val_accuracy"] == 0.5

    # Only the experiment changed: not into the old experiment's run.
    other = RunTracker.open(_cfg(tmp_path, uri1, "tracking.mlflow.experiment=other"), name="train",
                            tensorboard_dir=None, run_id=first.run_id)
    other.finish()
    client = MlflowClient(tracking_uri=uri1)
    assert other.run_id != first.run_id
    assert client.get_run(other.run_id).info.experiment_id == client.get_experiment_by_name("other").experiment_id

    # The old run was deleted.
    client.delete_run(first.run_id)
    again = RunTracker.open(_cfg(tmp_path, uri1), name="train", tensorboard_dir=None, run_id=first.run_id)
    again.finish()
    assert again.run_id != first.run_id
    assert not _warnings(capsys)


def test_a_resumed_search_starts_new_runs_when_tracking_mlflow_changed(tmp_path, sqlite_uri, capsys):
    from mlflow.tracking import MlflowClient

    from rayfine.tracking import SearchTracking

    uri1, uri2 = sqlite_uri("one.db"), sqlite_uri("two.db")
    first = SearchTracking(_cfg(tmp_path, uri1), ["train.lr"])
    first.on_trial_start(0, [], _trial("a"))
    first.finish(None, None, None, status="KILLED")
    state = json.loads(first.state_path.read_text())
    assert state == {"tracking_uri": uri1, "experiment": "t", "parent": first.parent.run_id,
                     "trials": {"a": first.run_ids["a"]}}

    resumed = SearchTracking(_cfg(tmp_path, uri1), ["train.lr"])  # unchanged: the same runs
    assert resumed.parent.run_id == first.parent.run_id and resumed.run_ids == first.run_ids
    resumed.finish(None, None, None, status="KILLED")
    # A new search over the same run directory (its Tune state gone, not --resume): new runs, and
    # the earlier parent is left as it ended.
    fresh = SearchTracking(_cfg(tmp_path, uri1), ["train.lr"], resume=False)
    fresh.finish(None, None, None, status="KILLED")
    assert fresh.parent.run_id != first.parent.run_id and fresh.run_ids == {}
    assert MlflowClient(tracking_uri=uri1).get_run(first.parent.run_id).info.status == "KILLED"
    resumed = SearchTracking(_cfg(tmp_path, uri1), ["train.lr"])  # the fresh search's runs now
    assert resumed.parent.run_id == fresh.parent.run_id
    resumed.finish(None, None, None, status="KILLED")

    moved = SearchTracking(_cfg(tmp_path, uri2), ["train.lr"])
    assert "starting a new run" in capsys.readouterr().err
    moved.on_trial_result(0, [], _trial("a"), dict(EPOCH))
    moved.finish(None, None, None, status="KILLED")
    assert moved.parent.run_id != first.parent.run_id and moved.run_ids["a"] != first.run_ids["a"]
    child = MlflowClient(tracking_uri=uri2).get_run(moved.run_ids["a"])
    assert child.data.tags["mlflow.parentRunId"] == moved.parent.run_id
    assert json.loads(moved.state_path.read_text())["tracking_uri"] == uri2

    renamed = SearchTracking(_cfg(tmp_path, uri2, "tracking.mlflow.experiment=other"), ["train.lr"])
    renamed.finish(None, None, None, status="KILLED")
    assert renamed.parent.run_id != moved.parent.run_id and renamed.run_ids == {}


def test_tracking_json_is_written_whole_and_an_unreadable_one_is_ignored(tmp_path, sqlite_uri, capsys, monkeypatch):
    import os

    from rayfine.tracking import SearchTracking

    cfg = _cfg(tmp_path, sqlite_uri())
    path = cfg.run_dir() / "tune" / "tracking.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"parent": "0123')  # cut short
    tracking = SearchTracking(cfg, ["train.lr"])
    (warning,) = _warnings(capsys)
    assert str(path) in warning
    before = path.read_text()
    assert json.loads(before)["parent"] == tracking.parent.run_id

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    tracking.on_trial_start(0, [], _trial("a"))  # its run id cannot be saved: the search goes on
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir() if "tracking" in p.name] == ["tracking.json"]  # no temp file left
    tracking.finish(None, None, None, status="KILLED")


def test_nan_and_inf_metrics_are_logged(tmp_path, sqlite_uri):
    from mlflow.tracking import MlflowClient

    from rayfine.tracking import RunTracker

    uri = sqlite_uri()
    tracker = RunTracker.open(_cfg(tmp_path, uri), name="train", tensorboard_dir=tmp_path / "tb")
    tracker.log_epoch({**EPOCH, "train_loss": float("inf"), "val_loss": float("nan"), "val_accuracy": None})
    tracker.finish()
    metrics = MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.metrics
    assert math.isnan(metrics["val_loss"]) and metrics["train_loss"] > 1e308  # sqlite keeps inf as the largest float
    assert "val_accuracy" not in metrics
    scalars = _scalars(tmp_path / "tb")
    assert math.isnan(scalars["val_loss"][0][1]) and scalars["train_loss"] == [(1, math.inf)]


def test_an_experiment_another_command_creates_meanwhile_is_used(tmp_path, sqlite_uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    from rayfine.tracking import RunTracker

    uri = sqlite_uri()
    lookup = MlflowClient.get_experiment_by_name
    calls = []

    def racing(self, name):
        if not calls:  # the first lookup misses; another command creates it right after
            MlflowClient(tracking_uri=uri).create_experiment(name)
            calls.append(name)
            return None
        return lookup(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", racing)
    tracker = RunTracker.open(_cfg(tmp_path, uri), name="train", tensorboard_dir=None)
    tracker.finish()
    client = MlflowClient(tracking_uri=uri)
    assert tracker.run_id is not None
    assert client.get_run(tracker.run_id).info.experiment_id == lookup(client, "t").experiment_id


def _ended(client, run_id: str) -> str:
    """The run's status, checking that it has an end time."""
    info = client.get_run(run_id).info
    assert info.end_time is not None, info
    return info.status


def test_a_failed_artifact_upload_turns_off_artifacts_only_and_the_run_still_ends(tmp_path, sqlite_uri, capsys,
                                                                                  monkeypatch):
    from mlflow.tracking import MlflowClient

    from rayfine.tracking import RunTracker, SearchTracking

    def no_space(*args, **kwargs):  # the artifact store, not the tracking store (S3 without boto3, a full disk)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MlflowClient, "log_dict", no_space)
    monkeypatch.setattr(MlflowClient, "log_artifacts", no_space)
    uri = sqlite_uri()
    client = MlflowClient(tracking_uri=uri)
    tracker = RunTracker.open(_cfg(tmp_path, uri), name="train", tensorboard_dir=None)
    tracker.log_epoch(EPOCH)
    tracker.log_evaluation(EVALUATION)
    tracker.log_checkpoint(tmp_path)
    tracker.log_metrics({"wall_s": 3.0})
    tracker.finish()
    assert _ended(client, tracker.run_id) == "FINISHED"
    assert {"val_accuracy", "test_accuracy", "wall_s"} <= set(client.get_run(tracker.run_id).data.metrics)
    (warning,) = _warnings(capsys)
    assert "logging eval.json" in warning and "artifact logging is off" in warning
    assert "metrics are still logged" in warning

    # A search: the parent's upload fails after its trials ended; the parent ends too.
    tracking = SearchTracking(_cfg(tmp_path, uri), ["train.lr"])
    a = _trial("a")
    tracking.on_trial_result(0, [], a, dict(EPOCH))
    tracking.on_trial_complete(0, [], a)
    summary = {"num_trials": 1, "epochs_run": 1, "epochs_full_budget": 1, "budget_fraction": 1.0, "wall_s": 1.0,
               "best": {"trial_id": "a", "val_accuracy": 0.5}}
    tracking.finish(summary, EVALUATION, tmp_path)
    assert len(_warnings(capsys)) == 1
    assert _ended(client, tracking.parent.run_id) == "FINISHED" and _ended(client, tracking.run_ids["a"]) == "FINISHED"
    assert client.get_run(tracking.parent.run_id).data.metrics["test_accuracy"] == 0.5


def test_runs_started_before_mlflow_was_turned_off_are_ended(tmp_path, sqlite_uri, capsys, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    import rayfine.tracking
    from rayfine.tracking import RunTracker, SearchTracking

    uri = sqlite_uri()
    client = MlflowClient(tracking_uri=uri)
    log_batch, broken = MlflowClient.log_batch, []

    def locked(self, *args, **kwargs):  # the store fails for a while (not an unreachable server)
        if broken:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return log_batch(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", locked)
    tracker = RunTracker.open(_cfg(tmp_path, uri), name="train", tensorboard_dir=None)
    broken.append(True)
    tracker.log_epoch(EPOCH)
    broken.clear()
    tracker.finish("FAILED")
    (warning,) = _warnings(capsys)
    assert "logging epoch 1" in warning
    assert _ended(client, tracker.run_id) == "FAILED"

    # A search: one trial's error turns MLflow off for all; the trial still open, the finished one
    # and the parent are ended all the same.
    tracking = SearchTracking(_cfg(tmp_path, uri), ["train.lr"])
    a, b = _trial("a"), _trial("b")
    tracking.on_trial_result(0, [], a, dict(EPOCH))
    tracking.on_trial_start(0, [], b)
    broken.append(True)
    tracking.on_trial_result(0, [], b, dict(EPOCH))
    broken.clear()
    tracking.on_trial_complete(0, [], a)
    tracking.finish(None, None, None, status="KILLED")
    assert len(_warnings(capsys)) == 1
    assert _ended(client, tracking.parent.run_id) == "KILLED"
    assert _ended(client, tracking.run_ids["a"]) == "FINISHED" and _ended(client, tracking.run_ids["b"]) == "KILLED"

    # A run whose params failed right after it was created is ended too.
    def no_params(*args):
        raise MlflowException("(sqlite3.OperationalError) database is locked")

    monkeypatch.setattr(rayfine.tracking, "_log_params", no_params)
    cfg = _cfg(tmp_path, uri, "tracking.mlflow.experiment=params")
    RunTracker.open(cfg, name="train", tensorboard_dir=None).finish()
    assert "logging the params" in _warnings(capsys)[0]
    (run,) = client.search_runs([client.get_experiment_by_name("params").experiment_id])
    assert _ended(client, run.info.run_id) == "FINISHED"


def test_a_password_in_the_tracking_uri_stays_out_of_params_tracking_json_and_the_report(tmp_path, sqlite_uri,
                                                                                          monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    import rayfine.tracking
    from rayfine.report import write_reports
    from rayfine.rundir import save_config
    from rayfine.tracking import RunTracker, SearchTracking, write_state

    secret = "postgresql://mlflow:S3cretPw@db.internal:5432/mlflow"
    shown = "postgresql://mlflow:***@db.internal:5432/mlflow"
    uri = sqlite_uri()
    client = MlflowClient(tracking_uri=uri)
    real = rayfine.tracking._mlflow_client
    # The database store is played by a sqlite one: the config, its params and tracking.json keep the URI.
    monkeypatch.setattr(rayfine.tracking, "_mlflow_client",
                        lambda cfg: real(cfg.with_overrides([f"tracking.mlflow.tracking_uri={uri}"])))
    cfg = _cfg(tmp_path, secret)
    tracker = RunTracker.open(cfg, name="train", tensorboard_dir=None)
    tracker.finish()
    params = client.get_run(tracker.run_id).data.params
    assert params["tracking.mlflow.tracking_uri"] == shown
    assert not [k for k, v in params.items() if "S3cretPw" in v]

    tracking = SearchTracking(cfg, ["train.lr"])
    tracking.finish(None, None, None, status="KILLED")
    assert "S3cretPw" not in tracking.state_path.read_text()
    assert json.loads(tracking.state_path.read_text())["tracking_uri"] == shown
    resumed = SearchTracking(cfg, ["train.lr"])  # the same runs: URIs compared without passwords
    assert resumed.parent.run_id == tracking.parent.run_id
    resumed.finish(None, None, None, status="KILLED")
    # A tracking.json of an earlier version, password and all (a new password since): the same server.
    write_state(tracking.state_path, {**json.loads(tracking.state_path.read_text()),
                                      "tracking_uri": secret.replace("S3cretPw", "old")})
    again = SearchTracking(cfg, ["train.lr"])
    assert again.parent.run_id == tracking.parent.run_id
    again.finish(None, None, None, status="KILLED")
    assert "S3cretPw" not in capsys.readouterr().err

    run_dir = cfg.run_dir()
    save_config(run_dir, "train", cfg.to_yaml())
    (run_dir / "train" / "metrics.jsonl").write_text(json.dumps(EPOCH) + "\n")
    (report,) = write_reports(run_dir)
    assert "S3cretPw" not in report.read_text() and shown in report.read_text()


def test_a_file_store_tracking_uri_is_refused_unless_mlflow_allows_it(tmp_path, monkeypatch):
    """MLflow 3 refuses to open its file store unless MLFLOW_ALLOW_FILE_STORE=true: `rayfine train`,
    `tune` and `run` refuse such a URI in their preflights, before Ray starts (the config itself is
    valid: the workers, whose environment may differ, validate it too). Databricks' URIs, which
    have no scheme either, are not paths."""
    from mlflow.tracking import MlflowClient

    from rayfine.config import ConfigError
    from rayfine.tracking import RunTracker, check_mlflow_store
    from rayfine.train.driver import preflight as train_preflight
    from rayfine.tune.search import preflight as tune_preflight

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in ("./mlruns", str(tmp_path / "mlruns"), f"file://{tmp_path / 'mlruns'}"):
        cfg = _cfg(tmp_path, uri)
        for preflight in (check_mlflow_store, train_preflight, tune_preflight):
            with pytest.raises(ConfigError) as info:
                preflight(cfg)
            (error,) = info.value.errors
            assert error.startswith(f"tracking.mlflow.tracking_uri {uri}: MLflow refuses to open its file store")
            assert "sqlite:///" in error and "MLFLOW_ALLOW_FILE_STORE=true" in error
    assert not (tmp_path / "mlruns").exists() and not cfg.run_dir().exists()
    for other in ("databricks", "databricks-uc", "uc", "databricks://profile", f"sqlite:///{tmp_path}/m.db"):
        check_mlflow_store(_cfg(tmp_path, other))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "yes")  # MLflow itself refuses this value
    with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE='yes' is not true, false, 1 or 0"):
        check_mlflow_store(cfg)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the user's choice: it works
    tracker = RunTracker.open(cfg, name="train", tensorboard_dir=None)
    tracker.log_epoch(EPOCH)
    tracker.finish()
    assert MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.metrics["val_accuracy"] == 0.5


def test_a_sampled_mapping_is_one_param_and_a_non_finite_test_loss_is_null_in_eval_json(tmp_path, sqlite_uri, capsys):
    """A searched train.class_weights mapping was split into one param per label, and MLflow
    refuses a param name such as "train.class_weights.rock&roll": MLflow went off for the whole
    search. A training run's eval.json artifact wrote an infinite test loss as bare Infinity,
    where the run directory's eval.json has null (strict JSON)."""
    from mlflow.tracking import MlflowClient

    from rayfine.tracking import RunTracker, SearchTracking

    uri = sqlite_uri()
    client = MlflowClient(tracking_uri=uri)
    tracking = SearchTracking(_cfg(tmp_path, uri), ["train.lr", "train.class_weights"])
    weights = {"rock&roll": 2.0, "pop": 1.0}
    trial = SimpleNamespace(trial_id="a", config={"train.lr": 0.01, "train.class_weights": weights})
    tracking.on_trial_result(0, [], trial, dict(EPOCH))
    tracking.on_trial_complete(0, [], trial)
    tracking.finish(None, None, None, status="FINISHED")
    assert _warnings(capsys) == []
    params = client.get_run(tracking.run_ids["a"]).data.params
    assert json.loads(params["train.class_weights"]) == weights and params["train.lr"] == "0.01"

    tracker = RunTracker.open(_cfg(tmp_path, uri), name="train", tensorboard_dir=None)
    tracker.log_evaluation({**EVALUATION, "loss": float("inf")})
    tracker.finish()
    text = Path(client.download_artifacts(tracker.run_id, "eval.json", str(tmp_path))).read_text()
    assert json.loads(text)["loss"] is None and "Infinity" not in text


def test_a_password_in_a_uris_query_is_masked():
    from rayfine.config.sections import redact_url_passwords

    assert redact_url_passwords("postgresql://host/db?user=u&password=S3cret&sslmode=require") == \
        "postgresql://host/db?user=u&password=***&sslmode=require"
    assert redact_url_passwords("mysql://u:S3cret@h/db?PWD=x;token=y") == "mysql://u:***@h/db?PWD=***;token=***"
    assert redact_url_passwords("sqlite:///runs/mlflow.db?mode=ro") == "sqlite:///runs/mlflow.db?mode=ro"
