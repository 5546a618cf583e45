"""The training path's driver and schedule, without Ray: a run continued with another number of
workers or another storage path, gradient accumulation's last group, the best checkpoint's export
from storage that is not local, and a plan refused before the data are read (unit)."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.fs
import pytest
import torch
from ray.train import Checkpoint

from rayfine import checkpoints
from rayfine.config import ConfigError, load_config
from rayfine.rundir import save_config
from rayfine.train import driver
from rayfine.train.worker import (
    accumulation_group_size,
    check_same_labels,
    checkpoint_metrics,
    keep_frozen_norm_statistics,
    make_scheduler,
    model_and_optimizer,
)

LABELS = [str(i) for i in range(10)]
EPOCHS = 4


def _cfg(*extra):
    return load_config("resnet18_digits_tiny", [f"train.epochs={EPOCHS}", "train.schedule=cosine",
                                                "train.warmup_fraction=0.1", *extra])


def _lrs(optimizer) -> list[float]:
    return [g["lr"] for g in optimizer.param_groups]


def _expected_lrs(cfg, steps_per_epoch: int, epochs_done: int) -> list[float]:
    """The learning rates of a run that trained ``epochs_done`` epochs of ``steps_per_epoch`` steps
    from the start: a fresh schedule stepped there."""
    _, optimizer, scheduler, _ = model_and_optimizer(cfg, LABELS, torch.device("cpu"), steps_per_epoch * EPOCHS)
    for _ in range(epochs_done * steps_per_epoch):
        optimizer.step()
        scheduler.step()
    return _lrs(optimizer)


def _checkpoint_after(tmp_path: Path, cfg, steps_per_epoch: int, epochs_done: int) -> tuple[str, list[float]]:
    """A per-epoch checkpoint of a run with ``steps_per_epoch`` after ``epochs_done`` epochs."""
    model, optimizer, scheduler, _ = model_and_optimizer(cfg, LABELS, torch.device("cpu"), steps_per_epoch * EPOCHS)
    for _ in range(epochs_done * steps_per_epoch):
        optimizer.step()
        scheduler.step()
    directory = tmp_path / f"ckpt_{steps_per_epoch}"
    checkpoints.save_checkpoint(directory, model, cfg, LABELS, {"epoch": epochs_done})
    checkpoints.save_train_state(directory, optimizer, scheduler, epoch=epochs_done)
    return str(directory), _lrs(optimizer)


@pytest.mark.parametrize("old_steps,new_steps", [(10, 5), (5, 10)], ids=["1->2 workers", "2->1 workers"])
def test_a_run_continued_with_another_number_of_workers_continues_its_schedule_by_epoch(tmp_path, old_steps, new_steps):
    """Each worker's shard is num_train // num_workers rows, so another scaling.num_workers changes
    the steps per epoch and the total the schedule is built for. The restored schedule must stand
    where a run of the new size stands after the same epochs, not at the old step count (with twice
    the workers: past its end, a learning rate of 0 for every epoch left)."""
    cfg = _cfg()
    done = 2
    directory, _ = _checkpoint_after(tmp_path, cfg, old_steps, done)
    messages: list[str] = []
    _, optimizer, scheduler, epoch = model_and_optimizer(cfg, LABELS, torch.device("cpu"), new_steps * EPOCHS,
                                                         directory, steps_per_epoch=new_steps, log=messages.append)
    assert epoch == done
    assert scheduler.last_epoch == done * new_steps
    expected = _expected_lrs(cfg, new_steps, done)
    assert _lrs(optimizer) == pytest.approx(expected) and scheduler.get_last_lr() == pytest.approx(expected)
    assert min(_lrs(optimizer)) > 0  # half-way through the cosine, not at its end
    assert messages and f"from {old_steps:g} to {new_steps}" in messages[0] and f"after epoch {done}" in messages[0]
    # The epochs left follow the new run's schedule step by step.
    reference = make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), cfg, new_steps * EPOCHS)
    for step in range(done * new_steps + 1, EPOCHS * new_steps + 1):
        optimizer.step()
        scheduler.step()
        factor = reference.lr_lambdas[0](step)
        assert _lrs(optimizer) == pytest.approx([base * factor for base in scheduler.base_lrs])


def test_a_run_continued_with_the_same_workers_restores_its_schedule_exactly(tmp_path):
    """The same steps per epoch: the learning rates are the checkpoint's own, bit for bit (a resumed
    run trains exactly as one that never stopped)."""
    cfg = _cfg()
    directory, saved = _checkpoint_after(tmp_path, cfg, 7, 3)
    messages: list[str] = []
    _, optimizer, scheduler, _ = model_and_optimizer(cfg, LABELS, torch.device("cpu"), 7 * EPOCHS, directory,
                                                     steps_per_epoch=7, log=messages.append)
    assert scheduler.last_epoch == 21 and _lrs(optimizer) == saved and not messages


@pytest.mark.parametrize("name, content, message", [
    ("model.safetensors", b"not safetensors", "model.safetensors is not a valid safetensors file"),
    ("train_state.json", b'{"epoch": 3, "scal', "train_state.json: unreadable training state"),
])
def test_a_broken_checkpoint_a_run_continues_from_is_named(tmp_path, name, content, message):
    """A per-epoch checkpoint a continued run starts from, truncated or not safetensors: a
    CheckpointError naming the file (never unpickled), as every other checkpoint load says it."""
    from rayfine.errors import CheckpointError

    cfg = _cfg()
    directory, _ = _checkpoint_after(tmp_path, cfg, 7, 3)
    assert (Path(directory) / name).is_file()
    (Path(directory) / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        model_and_optimizer(cfg, LABELS, torch.device("cpu"), 7 * EPOCHS, directory, steps_per_epoch=7)


def test_the_last_partial_accumulation_group_is_averaged_over_its_own_size():
    """grad_accum_steps 4 and 5 micro-batches: the fifth is a group of one, whose gradient is its
    own, not a quarter of it."""
    assert [accumulation_group_size(m, 5, 4) for m in range(1, 6)] == [4, 4, 4, 4, 1]
    assert [accumulation_group_size(m, 7, 3) for m in range(1, 8)] == [3, 3, 3, 3, 3, 3, 1]
    assert [accumulation_group_size(m, 8, 4) for m in range(1, 9)] == [4] * 8
    assert [accumulation_group_size(m, 3, 1) for m in range(1, 4)] == [1, 1, 1]
    assert [accumulation_group_size(m, 2, 4) for m in range(1, 3)] == [2, 2]  # an epoch shorter than a group

    # Accumulated as the loop does, each step's gradient is the mean of its group's micro-batch gradients.
    w = torch.nn.Parameter(torch.zeros(3))
    xs = [torch.randn(3) for _ in range(5)]
    grads = []
    for micro, x in enumerate(xs, start=1):
        ((w * x).sum() / accumulation_group_size(micro, len(xs), 4)).backward()
        if micro % 4 == 0 or micro == len(xs):
            grads.append(w.grad.clone())
            w.grad = None
    assert torch.allclose(grads[0], torch.stack(xs[:4]).mean(0)) and torch.allclose(grads[1], xs[4])


# --- storage.storage_path on a continued run ---------------------------------------------------------

def _finished_run(tmp_path: Path, *extra) -> Path:
    cfg = load_config("resnet18_digits_tiny", [f"storage.runs_dir={tmp_path}", "name=run", *extra])
    save_config(cfg.run_dir(), "train", cfg.to_yaml())
    (cfg.run_dir() / "train" / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    if "://" not in cfg.resolved_storage_path():  # its Ray Train state, as Ray Train leaves it
        (Path(cfg.resolved_storage_path()) / "train").mkdir(parents=True)
        (Path(cfg.resolved_storage_path()) / "train" / "checkpoint_manager_snapshot.json").write_text("{}")
    return cfg.run_dir()


@pytest.fixture
def no_source_or_model_checks(monkeypatch):
    monkeypatch.setattr(driver, "check_source", lambda data: None)
    monkeypatch.setattr(driver, "check_model", lambda cfg: None)


def test_continuing_a_run_with_another_storage_path_is_refused(tmp_path, no_source_or_model_checks):
    """Ray Train resumes from the checkpoints under storage.storage_path: under another one the
    run would start again from epoch 1 while the logs say it continues."""
    run_dir = _finished_run(tmp_path)
    cfg = load_config("resnet18_digits_tiny", [f"storage.runs_dir={tmp_path}", "name=run",
                                               "storage.storage_path=s3://bucket/rayfine"])
    with pytest.raises(ConfigError) as refused:
        driver.preflight(cfg)
    message = str(refused.value)
    assert "storage.storage_path changed from null to s3://bucket/rayfine:" in message and str(run_dir / "ray") in message
    assert "unset storage.storage_path again" in message and "choose another `name`" in message

    # Back to the run's own storage, or the same place spelt out: it continues.
    assert driver.preflight(cfg.with_overrides(["storage.storage_path=null"])) is True
    # The run's own storage is <run_dir>/ray; a storage path holds its experiments as
    # <storage_path>/<name>/ray, so the runs_dir as storage path is that same place.
    assert driver.preflight(cfg.with_overrides([f"storage.storage_path={tmp_path}"])) is True
    # A search beside the training run keeps its own storage: only continuing the run is refused.
    assert driver._check_continuation(run_dir, cfg) is True


def test_a_run_on_remote_storage_continues_only_on_that_storage(tmp_path, no_source_or_model_checks, monkeypatch):
    # The bucket cannot be listed here (no network): train_state answers None, "cannot be told", as it
    # does after pyarrow's ~6 s of failing to resolve it.
    monkeypatch.setattr(driver, "train_state", lambda cfg: None)
    _finished_run(tmp_path, "storage.storage_path=s3://bucket/a")
    cfg = load_config("resnet18_digits_tiny", [f"storage.runs_dir={tmp_path}", "name=run", "storage.storage_path=s3://bucket/a/"])
    assert driver.preflight(cfg) is True
    with pytest.raises(ConfigError, match=r"set storage.storage_path back to s3://bucket/a;"):
        driver.preflight(cfg.with_overrides(["storage.storage_path=s3://bucket/b"]))


def test_a_new_run_over_earlier_ray_state_in_a_storage_path_is_refused(tmp_path, no_source_or_model_checks):
    """Removing a run directory leaves its Ray Train state in a storage.storage_path: a new run of
    that name would resume from those checkpoints under another config."""
    cfg = load_config("resnet18_digits_tiny", [f"storage.runs_dir={tmp_path / 'runs'}", "name=run",
                                               f"storage.storage_path={tmp_path / 'shared'}"])
    assert driver.preflight(cfg) is False
    state = tmp_path / "shared" / "run" / "ray" / "train"
    state.mkdir(parents=True)
    (state / "checkpoint_manager_snapshot.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holds an earlier run's checkpoints of this name"):
        driver.preflight(cfg)
    assert driver.preflight(cfg.with_overrides(["name=other"])) is False
    # The same where the storage is a URI (s3://, gs://, file://): listed through pyarrow, as Ray Train opens it.
    uri = cfg.with_overrides([f"storage.storage_path=file://{tmp_path / 'shared'}"])
    assert uri.resolved_storage_path() == f"file://{state.parent}"
    with pytest.raises(ConfigError, match=rf"storage.storage_path: file://{state} holds an earlier run's checkpoints"):
        driver.preflight(uri)
    (state / "checkpoint_manager_snapshot.json").unlink()
    assert driver.preflight(uri) is False


def test_a_new_run_over_ray_state_left_in_the_run_directory_is_refused_unless_it_is_this_run(
        tmp_path, no_source_or_model_checks):
    """With the default storage (<run>/ray), removing the run's train/ folder to train again left
    Ray Train's checkpoints behind: the new run resumed from them, its weights, epoch count and
    optimizer (the learning rate given now too) the old run's, and no config was compared. Only
    the same run killed before its first epoch was logged (its train/config.yaml kept) continues."""
    run_dir = _finished_run(tmp_path)
    cfg = load_config("resnet18_digits_tiny", [f"storage.runs_dir={tmp_path}", "name=run"])
    (run_dir / "train" / "metrics.jsonl").unlink()  # killed before the first epoch was logged
    assert driver.preflight(cfg) is False
    with pytest.raises(ConfigError, match=rf"{run_dir}/ray/train holds the checkpoints of an earlier run of a "
                                          rf"different config \(changed: train.lr\).*remove {run_dir}/ray to train"):
        driver.preflight(cfg.with_overrides(["train.lr=0.05"]))
    assert driver.preflight(cfg.with_overrides(["train.max_failures=0"])) is False  # a change a run may continue with
    shutil.rmtree(run_dir / "train")
    with pytest.raises(ConfigError, match=rf"earlier run whose {run_dir}/train folder is gone"):
        driver.preflight(cfg)
    shutil.rmtree(run_dir / "ray")
    assert driver.preflight(cfg) is False


def test_a_run_whose_checkpoints_are_gone_is_refused_not_retrained_under_its_old_log(tmp_path,
                                                                                     no_source_or_model_checks):
    """metrics.jsonl says the run trained epochs that Ray Train's storage no longer holds: Ray Train
    would start again from epoch 1 and every epoch would be logged twice."""
    run_dir = _finished_run(tmp_path)
    cfg = load_config("resnet18_digits_tiny", [f"storage.runs_dir={tmp_path}", "name=run"])
    assert driver.preflight(cfg) is True
    shutil.rmtree(run_dir / "ray")
    with pytest.raises(ConfigError, match=rf"{run_dir} holds 1 trained epoch\(s\) of this run, but its checkpoints "
                                          rf"under {run_dir}/ray/train are gone.*remove {run_dir} to train it"):
        driver.preflight(cfg)
    (run_dir / "train" / "metrics.jsonl").write_text("")  # killed before its first epoch: nothing to lose
    assert driver.preflight(cfg) is True


def test_a_changed_config_refusal_names_the_storage_a_run_keeps_elsewhere(tmp_path, no_source_or_model_checks):
    _finished_run(tmp_path, f"storage.storage_path={tmp_path / 'shared'}")
    cfg = load_config("resnet18_digits_tiny", [f"storage.runs_dir={tmp_path}", "name=run", "train.lr=0.5",
                                               f"storage.storage_path={tmp_path / 'shared'}"])
    with pytest.raises(ConfigError, match=rf"remove that directory and {tmp_path / 'shared' / 'run' / 'ray'} \(its "
                                          r"Ray state\)"):
        driver.preflight(cfg)


# --- the driver's _fit with a fake trainer ------------------------------------------------------------

class _Tracker:
    run_id = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@pytest.fixture
def fake_driver(monkeypatch, tmp_path):
    """``_fit`` around a trainer whose result is given, with no Ray: records what it calls."""
    calls: list[str] = []
    state = SimpleNamespace(calls=calls, result=None, cpus=2.0)

    class Trainer:
        def fit(self):
            calls.append("fit")
            return state.result

    def build_datasets(cfg, log):
        calls.append("build_datasets")
        return {"train": None, "val": None, "test": None}, SimpleNamespace(num_examples={"test": 1}, to_dict=dict)

    def evaluate_checkpoint(path, dataset, out_dir, log, num_samples):
        calls.append(f"evaluate {path}")
        checkpoints.load_checkpoint(path)  # a whole checkpoint was exported
        return {"accuracy": 1.0, "macro_f1": 1.0}

    import rayfine.evaluate
    import rayfine.report

    monkeypatch.setattr(driver.ray, "cluster_resources", lambda: {"CPU": state.cpus})
    monkeypatch.setattr(driver.ray, "available_resources", lambda: {"CPU": state.cpus})  # all of it free
    monkeypatch.setattr(driver, "build_datasets", build_datasets)
    monkeypatch.setattr(driver, "build_trainer", lambda *args, **kwargs: Trainer())
    monkeypatch.setattr(driver, "_open_tracker", lambda *args: _Tracker())
    monkeypatch.setattr(rayfine.evaluate, "evaluate_checkpoint", evaluate_checkpoint)
    monkeypatch.setattr(rayfine.report, "train_report", lambda run_dir: "report.html")
    return state


def test_the_best_checkpoint_is_exported_from_storage_that_is_not_a_local_path(tmp_path, fake_driver):
    """With storage.storage_path s3://..., Ray Train's Checkpoint.path is a path inside the remote
    filesystem (no scheme), not a local one. A filesystem rooted elsewhere stands in for S3 here."""
    cfg = load_config("resnet18_digits_tiny", [f"storage.runs_dir={tmp_path / 'runs'}", "name=remote"])
    bucket = tmp_path / "bucket"
    model, _, _, _ = model_and_optimizer(cfg, LABELS, torch.device("cpu"), 10)
    checkpoints.save_checkpoint(bucket / "remote" / "train" / "checkpoint_000000", model, cfg, LABELS,
                                {"epoch": 1, "val_accuracy": 0.5})
    fs = pyarrow.fs.SubTreeFileSystem(str(bucket), pyarrow.fs.LocalFileSystem())
    remote = Checkpoint("/remote/train/checkpoint_000000", filesystem=fs)
    assert not Path(remote.path).exists()
    fake_driver.result = SimpleNamespace(error=None, best_checkpoints=[(remote, {"epoch": 1, "val_accuracy": 0.5})])

    summary = driver._fit(cfg, False, datasets=None, info=None, train_loop=None, strict_resources=True,
                          log=lambda *_: None)
    exported = Path(summary["checkpoint"])
    assert exported == cfg.run_dir() / "train" / "checkpoint"
    assert sorted(p.name for p in exported.iterdir()) == sorted(checkpoints.INFERENCE_FILES)
    assert fake_driver.calls == ["build_datasets", "fit", f"evaluate {exported}"]


def test_a_plan_that_does_not_fit_is_refused_before_the_data_are_read(tmp_path, fake_driver):
    """README: on an embedded local Ray a plan that does not fit is refused up front."""
    cfg = load_config("resnet18_digits_tiny", [f"storage.runs_dir={tmp_path}", "name=big", "scaling.num_workers=4"])
    fake_driver.cpus = 2.0
    with pytest.raises(ConfigError, match="needs 3.5 CPUs"):
        driver._fit(cfg, False, datasets=None, info=None, train_loop=None, strict_resources=True, log=lambda *_: None)
    assert fake_driver.calls == []
    assert not (cfg.run_dir() / "train" / "config.yaml").exists()

    # On a cluster that may scale up it is a warning, and the run goes on.
    messages: list[str] = []
    fake_driver.result = SimpleNamespace(error="stop here", best_checkpoints=[])
    with pytest.raises(driver.TrainingError, match="stop here"):
        driver._fit(cfg, False, datasets=None, info=None, train_loop=None, strict_resources=False, log=messages.append)
    assert messages[0].startswith("[warning] needs 3.5 CPUs") and fake_driver.calls == ["build_datasets", "fit"]


def test_ddp_trains_a_hugging_face_classifier_whose_mask_token_classification_never_uses(tmp_path):
    """DINOv2's classifier holds a mask_token (XLNet's a mask_emb) that only masked inputs read: DDP
    fails at the second step unless it looks for unused parameters, which rayfine asks of it for
    such a model only (rayfine.train.worker.ddp_options: one pass on an example input). One gloo
    process: DDP's reducer checks the same as with more."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from rayfine.models import build_model
    from rayfine.train.worker import ddp_options, model_example

    cpu = torch.device("cpu")
    cfg = load_config("resnet18_digits_tiny", [
        "model.name=dinov2", "model.pretrained=false", "data.image_size=16", "data.color_mode=RGB",
        "model.config_overrides={hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, patch_size: 4}"])
    for every_parameter_used in (load_config("resnet18_digits_tiny"), load_config("minilm_rotten_tomatoes_tiny")):
        model = build_model(every_parameter_used, ["a", "b"])
        assert ddp_options(model, model_example(every_parameter_used, cpu)) == {}
        assert all(p.grad is None for p in model.parameters())  # the pass leaves no gradient behind

    def two_steps(options: dict) -> None:
        torch.manual_seed(0)
        model = DistributedDataParallel(build_model(cfg, ["a", "b"]), **options)
        assert any("mask_token" in name for name, p in model.named_parameters() if p.requires_grad)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            logits = model(pixel_values=torch.randn(4, 3, 16, 16)).logits
            torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
            optimizer.step()
            optimizer.zero_grad()

    options = ddp_options(build_model(cfg, ["a", "b"]), model_example(cfg, cpu))
    assert options == {"find_unused_parameters": True}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="Expected to have finished reduction in the prior iteration"):
            two_steps({})
        two_steps(options)
    finally:
        dist.destroy_process_group()


def test_a_diverged_epoch_is_never_the_best_checkpoint(tmp_path):
    """train.metric val_loss: Ray ranks a NaN score below every number, so best_checkpoints lists
    it first when loss is minimized; rayfine must pick the finite epoch, and refuse when none is."""
    cfg = load_config("resnet18_digits_tiny", ["train.metric=val_loss"])
    kept = [("ckpt_epoch2", {"epoch": 2, "val_loss": float("nan")}), ("ckpt_epoch1", {"epoch": 1, "val_loss": 0.5})]
    assert driver._best(SimpleNamespace(best_checkpoints=kept), cfg)[0] == "ckpt_epoch1"
    tied = [("ckpt_epoch1", {"epoch": 1, "val_loss": 0.5}), ("ckpt_epoch3", {"epoch": 3, "val_loss": 0.5})]
    assert driver._best(SimpleNamespace(best_checkpoints=tied), cfg)[0] == "ckpt_epoch3"  # ties: the later
    with pytest.raises(driver.TrainingError, match="no kept checkpoint has a finite val_loss"):
        driver._best(SimpleNamespace(best_checkpoints=kept[:1]), cfg)


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"not JSON (RFC 8259): {token}")

    return json.loads(text, parse_constant=refuse)


def test_metric_files_write_a_diverged_value_as_json_null(tmp_path):
    """metrics.jsonl and a checkpoint's metrics.json are read by jq, JavaScript and Go, which refuse
    Python's bare NaN and Infinity; the epoch line still prints, and a resumed run reports NaN again."""
    log = driver.MetricsLog(str(tmp_path / "metrics.jsonl"))
    epoch = {"epoch": 1, "train_loss": float("nan"), "val_loss": float("inf"), "val_accuracy": 0.1,
             "val_macro_f1": 0.02, "samples_per_s": 10.0, "epoch_s": 1.0}
    log.after_report(None, [epoch], None)
    line = _strict_json((tmp_path / "metrics.jsonl").read_text())
    assert line["train_loss"] is None and line["val_loss"] is None and line["val_accuracy"] == 0.1
    # The driver follows the file (progress line, MLflow, TensorBoard): a number again, NaN.
    followed, stop = [], threading.Event()
    follower = threading.Thread(target=driver._follow, args=(tmp_path / "later.jsonl", stop, followed.append))
    follower.start()
    (tmp_path / "later.jsonl").write_text((tmp_path / "metrics.jsonl").read_text())
    stop.set()
    follower.join(10)
    assert math.isnan(followed[0]["val_loss"]) and math.isnan(followed[0]["train_loss"])
    assert "train_loss nan  val_loss nan  val_acc 0.1000" in driver.format_epoch(followed[0], 4)
    assert f"{followed[0]['val_loss']:.4f}" == "nan"  # the progress bar's postfix

    cfg = load_config("resnet18_digits_tiny")
    model, _, _, _ = model_and_optimizer(cfg, LABELS, torch.device("cpu"), 10)
    saved = checkpoints.save_checkpoint(tmp_path / "ckpt", model, cfg, LABELS, {**epoch, "val_accuracy": torch.tensor(0.5).item()})
    assert _strict_json((saved / checkpoints.METRICS_FILE).read_text())["val_loss"] is None
    resumed = checkpoint_metrics(saved)  # what a resumed run reports again to Ray Train, which scores it
    assert math.isnan(resumed["val_loss"]) and math.isnan(resumed["train_loss"]) and resumed["epoch"] == 1


def test_a_trials_epoch_log_reads_a_diverged_value_back_as_nan(tmp_path):
    """epochs.jsonl feeds a resumed search's schedulers (halving's rungs compute with float()) and
    its table: a null written for a NaN is read back as NaN."""
    from rayfine.metrics import json_text
    from rayfine.tune.trial import read_epoch_log

    (tmp_path / "epochs.jsonl").write_text(json_text({"epoch": 1, "val_loss": float("nan"), "val_accuracy": 0.5,
                                                      "checkpoint_path": None}) + "\n")
    (record,) = read_epoch_log(str(tmp_path / "epochs.jsonl"))
    assert math.isnan(record["val_loss"]) and record["val_accuracy"] == 0.5 and record["checkpoint_path"] is None


def test_a_run_continues_only_with_the_labels_it_was_trained_on(tmp_path):
    """The head's rows are the labels in order: data whose classes changed since (or the same
    names read decomposed before, which sort otherwise) must not train under each other's rows."""
    import unicodedata

    cfg = load_config("resnet18_digits_tiny")
    model, _, _, _ = model_and_optimizer(cfg, LABELS, torch.device("cpu"), 10)
    checkpoints.save_checkpoint(tmp_path / "ckpt", model, cfg, LABELS, {"epoch": 1})
    checkpoints.save_train_state(tmp_path / "ckpt", *model_and_optimizer(cfg, LABELS, torch.device("cpu"), 10)[1:3], 1)
    assert model_and_optimizer(cfg, LABELS, torch.device("cpu"), 10, str(tmp_path / "ckpt"))[3] == 1
    moved = LABELS[1:] + LABELS[:1]
    with pytest.raises(driver.TrainingError, match=r"was trained on the labels \['0', '1'.*the data now gives \['1', "):
        model_and_optimizer(cfg, moved, torch.device("cpu"), 10, str(tmp_path / "ckpt"))
    # Saved decomposed by an older rayfine, read composed now, in the same order: the same classes.
    nfd = [unicodedata.normalize("NFD", "été"), "hiver"]
    checkpoints.save_checkpoint(tmp_path / "old", model_and_optimizer(cfg, nfd, torch.device("cpu"), 10)[0], cfg, nfd,
                                {"epoch": 1})
    check_same_labels(tmp_path / "old", [unicodedata.normalize("NFC", "été"), "hiver"])


def test_a_frozen_bodys_batchnorm_keeps_its_statistics_and_the_heads_train():
    """train.freeze_epochs (-1: a linear probe): the body takes no gradient, and its BatchNorm layers
    normalize with their running statistics and keep them; in train mode one step moved them."""
    from rayfine.models import build_model

    model = build_model(_cfg(), LABELS)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("net.fc."))  # the body frozen, as the worker freezes it
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    assert before

    def step():
        model.train()
        keep_frozen_norm_statistics(model)
        model(torch.randn(4, 1, 8, 8) * 3 + 1).sum().backward()

    step()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert model.training and model.net.fc.weight.grad is not None
    # Unfrozen, the same step updates them, as any fine-tuning does.
    for p in model.parameters():
        p.requires_grad_(True)
    step()
    assert not any(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_hugging_face_run_is_trained_on_from_its_checkpoint_directory(tmp_path):
    """model.weights applies to torchvision and EfficientNet-Lite0; a Hugging Face model starts from
    the checkpoint itself, a Hugging Face model directory."""
    (tmp_path / "train" / "checkpoint").mkdir(parents=True)
    hint = driver._train_on_hint(tmp_path, load_config("minilm_rotten_tomatoes_tiny"))
    assert hint.endswith(f"--set model.name={tmp_path / 'train' / 'checkpoint'}")
    assert driver._train_on_hint(tmp_path / "none", load_config("minilm_rotten_tomatoes_tiny")) == ""


class _Shard:
    """A worker's dataset shard as the loop reads it: ``iter_torch_batches`` of dict batches."""

    def __init__(self, batches):
        self.batches = batches

    def iter_torch_batches(self, batch_size, collate_fn=None):
        return iter(self.batches)


def test_validation_counts_and_loss_are_those_of_the_whole_shard():
    """_validate keeps labels, predictions and losses on the device until the shard ends (no wait
    per batch on CUDA); what it returns is still every batch's confusion counts and summed loss."""
    from rayfine.train.worker import ExitGuard, _validate

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 4)  # 4 labels; the batches hold only 3 of them
    batches = [{"input": torch.randn(n, 3), "y": torch.randint(0, 3, (n,))} for n in (5, 5, 2)]
    cfg = load_config("minilm_rotten_tomatoes_tiny")  # text batches reach the model as they are
    args = (cfg, 4, None, lambda b: b, contextlib.nullcontext(), ExitGuard())
    counts, loss = _validate(net, _Shard([dict(b) for b in batches]), *args)

    x, y = torch.cat([b["input"] for b in batches]), torch.cat([b["y"] for b in batches])
    with torch.no_grad():
        logits = net(x)
    expected = np.zeros((4, 4), np.int64)
    np.add.at(expected, (y.numpy(), logits.argmax(-1).numpy()), 1)
    assert counts.tolist() == expected.tolist() and counts.sum() == 12
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, y, reduction="sum").item(), rel=1e-6)
    assert not net.training
    # A rank whose validation shard is empty counts nothing.
    counts, loss = _validate(net, _Shard([]), *args)
    assert counts.sum() == 0 and loss == 0.0
