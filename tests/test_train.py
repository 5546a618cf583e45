"""Real Ray Train runs: 2 DDP workers on real digits, a failed run continued, a worker ended with
SIGTERM mid-epoch (ray tier). A worker SIGKILLed mid-epoch and while a checkpoint is written:
tests/test_faults.py."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from net_tools import wait_for
from report_checks import check_report

from rayfine.checkpoints import INFERENCE_FILES, load_checkpoint
from rayfine.config import ConfigError, load_config
from rayfine.data import build_datasets
from rayfine.errors import TrainingError
from rayfine.evaluate import predict_dataset
from rayfine.train import METRIC_KEYS, fit, train_loop_per_worker
from rayfine.train.worker import seed_epoch, train_batches

pytestmark = pytest.mark.ray
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny(tmp_path, name, *extra):
    return load_config("resnet18_digits_tiny", [f"name={name}", f"storage.runs_dir={tmp_path}", *extra])


def epochs_logged(run_dir):
    path = run_dir / "train" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()]


def test_train_batches_leave_out_only_a_lone_last_example():
    assert train_batches(239, 34) == 7  # 7 x 34 + 1: the lone example is left out
    assert train_batches(240, 34) == 8  # 7 x 34 + 2: a last batch of 2 trains
    assert train_batches(238, 34) == 7
    assert train_batches(35, 34) == 1
    assert train_batches(1, 34) == 1  # the only example is not left out


def test_an_epochs_dropout_depends_on_seed_epoch_and_rank_alone():
    """What a resumed epoch draws (dropout masks) is what it drew before the failure, however much
    the process drew before it; ranks and epochs draw differently."""
    dropout = torch.nn.Dropout(0.5)
    ones = torch.ones(64)

    def mask(seed, epoch, rank, drawn_before):
        torch.rand(drawn_before)  # the epochs before, a model's initialization
        seed_epoch(seed, epoch, rank)
        return dropout(ones) > 0

    assert torch.equal(mask(0, 2, 0, drawn_before=0), mask(0, 2, 0, drawn_before=1000))
    assert not torch.equal(mask(0, 2, 0, 0), mask(0, 2, 1, 0))
    assert not torch.equal(mask(0, 2, 0, 0), mask(0, 3, 0, 0))


def test_mlflow_params_take_label_names_mlflow_would_refuse_as_keys(tmp_path):
    """class_weights is keyed by the user's labels ("R&B"): one JSON param, not a param per label."""
    from mlflow.tracking import MlflowClient

    from rayfine.tracking import RunTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config("resnet18_digits_tiny", ["train.class_weights={'R&B': 2.0, 'pop?': 1.0}",
                                               f"tracking.mlflow.tracking_uri={uri}"])
    tracker = RunTracker.open(cfg, name="train", tensorboard_dir=None)
    tracker.finish()
    params = MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.params
    assert json.loads(params["train.class_weights"]) == {"R&B": 2.0, "pop?": 1.0}


def test_two_worker_run_learns_and_writes_the_run_directory(ray_local, digits_run):
    # conftest's digits_run: 3 epochs on 2 workers, batch 34 (a lone last example per worker).
    cfg, summary, run = digits_run.cfg, digits_run.summary, digits_run.dir

    lines = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    assert all(set(METRIC_KEYS) == set(m) for m in lines)
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    # 10 classes: chance is 0.1; the real digits are learnt.
    assert max(m["val_accuracy"] for m in lines) > 0.6

    ckpt_dir = run / "train" / "checkpoint"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted(INFERENCE_FILES)
    assert (run / "config.yaml").read_text() == cfg.to_yaml()
    report = json.loads((run / "train" / "eval.json").read_text())
    assert {"split", "accuracy", "macro_f1", "loss", "num_samples", "per_class"} <= set(report)
    assert report["split"] == "test" and report["accuracy"] > 0.6
    assert set(report["per_class"]) == {str(d) for d in range(10)}
    assert sum(c["support"] for c in report["per_class"].values()) == report["num_samples"]
    assert "precision" in (run / "train" / "classification_report.txt").read_text()
    assert (run / "train" / "confusion_matrix.png").read_bytes()[:8] == PNG_MAGIC
    html = check_report(run / "train" / "report.html", ["best", "curves", "evaluation", "config"], 2)
    assert f"accuracy <b>{report['accuracy']:.4f}</b>" in html  # the test evaluation it reports

    # The exported checkpoint alone reproduces the reported test accuracy.
    datasets, _ = build_datasets(cfg, log=lambda *_: None)
    assert datasets["train"].count() // 2 % cfg.train.batch_size == 1  # the case above, still
    ckpt = load_checkpoint(ckpt_dir)
    y, probs = predict_dataset(ckpt, datasets["test"])
    assert len(y) == report["num_samples"]
    assert (probs.argmax(1) == y).mean() == pytest.approx(report["accuracy"])
    _, log_probs = predict_dataset(ckpt, datasets["test"], log_probs=True)  # the loss: cross-entropy, as val_loss
    assert -log_probs[np.arange(len(y)), y].astype(np.float64).mean() == pytest.approx(report["loss"], rel=1e-5)
    best = max(lines, key=lambda m: m["val_accuracy"])
    assert ckpt.metrics["val_accuracy"] == pytest.approx(best["val_accuracy"])
    # Each epoch's validation figures, reported from two ranks' shards, are those of the epoch's
    # checkpoint (rank 0's weights and BatchNorm statistics) over the whole val split.
    stored = {json.loads((d / "metrics.json").read_text())["epoch"]: d for d in (run / "ray").glob("*/checkpoint_*") if d.is_dir()}
    assert sorted(stored) == [1, 2, 3]
    for line in lines:
        y, probs = predict_dataset(load_checkpoint(stored[line["epoch"]]), datasets["val"])
        assert (probs.argmax(1) == y).mean() == pytest.approx(line["val_accuracy"])
        assert -np.log(probs[np.arange(len(y)), y]).mean() == pytest.approx(line["val_loss"], rel=1e-4)
    assert summary["eval"]["accuracy"] == report["accuracy"]

    # Tracking: one MLflow run with a point per epoch, the test figures and the checkpoint;
    # TensorBoard event files in the run directory.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=digits_run.mlflow_uri)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.params["train.lr"] == str(cfg.train.lr)
    assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "val_accuracy")] == [1, 2, 3]
    assert mlflow_run.data.metrics["test_accuracy"] == pytest.approx(report["accuracy"])
    assert "checkpoint/model.safetensors" in {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "checkpoint")}
    assert any((run / "train" / "tensorboard").glob("events.out.tfevents.*"))


def _fails_once_after_epoch_1(config):
    """The real loop, with ray.train.report patched to fail right after epoch 1 is reported."""
    import ray.train

    real_report = ray.train.report

    from rayfine.config import Config

    logged = Config.model_validate_json(config["cfg"]).run_dir() / "train" / "metrics.jsonl"

    def report(metrics, checkpoint=None, **kw):
        real_report(metrics, checkpoint=checkpoint, **kw)
        if metrics["epoch"] == 1:
            # Fail once the controller has taken the report in (as a crash during epoch 2 would
            # find it), not in the same instant: that race could lose the report itself.
            deadline = time.monotonic() + 60
            while not (logged.exists() and logged.read_text().strip()) and time.monotonic() < deadline:
                time.sleep(0.1)
            raise RuntimeError("injected failure after epoch 1")

    ray.train.report = report
    try:
        train_loop_per_worker(config)
    finally:
        ray.train.report = real_report


def test_failed_run_continues_when_run_again(ray_local, tmp_path):
    import sys

    from ray import cloudpickle

    # Ship this module's failing loop to the workers by value (they cannot import test files).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # bf16 autocast and gradient accumulation ride along: their code paths run for real here. A
    # twentieth of the digits in batches of 8: on a CPU without native bfloat16 a ResNet's backward
    # pass takes ~40x as long as in fp32, in proportion to the images.
    cfg = tiny(tmp_path, "again", "train.epochs=2", "train.max_failures=0", "train.precision=bf16", "train.grad_accum_steps=2",
               "data.subsample=0.05", "train.batch_size=8")
    datasets, info = build_datasets(cfg, log=lambda *_: None)
    with pytest.raises(TrainingError, match="injected failure after epoch 1"):
        fit(cfg, datasets=datasets, info=info, train_loop=_fails_once_after_epoch_1, log=lambda *_: None)
    assert epochs_logged(tmp_path / "again") == [1]

    messages: list[str] = []
    fit(cfg, datasets=datasets, info=info, log=messages.append)
    assert epochs_logged(tmp_path / "again") == [1, 2]
    assert any("continuing" in m and "after 1 finished epoch" in m for m in messages)

    # A driver killed after Ray Train registered epoch 2's checkpoint but before MetricsLog wrote its
    # line: run again, the run resumes after epoch 2, and its workers replay that epoch's report
    # from the checkpoint (trained again, epoch_s and samples_per_s would differ).
    metrics_path = tmp_path / "again" / "train" / "metrics.jsonl"
    lines = metrics_path.read_text().splitlines()
    metrics_path.write_text(lines[0] + "\n")
    messages.clear()
    fit(cfg, datasets=datasets, info=info, log=messages.append)
    assert any("after 1 finished epoch" in m for m in messages)
    assert metrics_path.read_text().splitlines() == lines

    # A different experiment under the same name is refused rather than mixed in.
    with pytest.raises(ConfigError, match="changed: train.lr"):
        fit(cfg.with_overrides(["train.lr=0.1"]), datasets=datasets, info=info, log=lambda *_: None)
    assert np.isfinite(json.loads((tmp_path / "again" / "train" / "eval.json").read_text())["loss"])
    # Each worker read its own shard (rayfine.train.ShardedIngest): Ray Train started no split
    # coordinator for any of these runs (the state API lists dead actors too).
    from ray.util.state import list_actors

    assert list_actors(filters=[("class_name", "=", "SplitCoordinator")]) == []


def test_ctrl_c_aborts_the_run_as_a_keyboard_interrupt_and_gives_the_caller_its_handler_back(ray_local, tmp_path):
    """Ray Train's own SIGINT handler aborted the run and left fit() by SystemExit (`rayfine train`
    exited 1 with no word, not 130; a notebook's `except KeyboardInterrupt` missed it), and stayed
    installed after fit(), swallowing the caller's next Ctrl-Cs."""
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny(tmp_path, "interrupted", "train.epochs=8", f"tracking.mlflow.tracking_uri={uri}")
    previous = signal.getsignal(signal.SIGINT)

    def ctrl_c_after_epoch_1() -> None:
        wait_for(lambda: epochs_logged(tmp_path / "interrupted"), 300, 0.1, "epoch 1")
        os.kill(os.getpid(), signal.SIGINT)  # to the main thread, where fit() waits on Ray Train

    threading.Thread(target=ctrl_c_after_epoch_1, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, log=lambda *_: None)
    assert signal.getsignal(signal.SIGINT) is previous
    assert 1 <= len(epochs_logged(tmp_path / "interrupted")) < 8
    # The MLflow run is ended as one the user stopped (KILLED), as an interrupted search's are, not FAILED.
    client = MlflowClient(tracking_uri=uri)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id])
    assert mlflow_run.info.status == "KILLED"
    # Aborted, not left training in the background: the run's workers end.
    wait_for(lambda: not list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]), 60,
             0.5, "the interrupted run's workers to end")


def test_bf16_warns_only_on_a_cpu_that_would_emulate_it(monkeypatch):
    from rayfine.train import worker

    monkeypatch.setattr(worker, "cpu_has_native_bf16", lambda: False)
    warning = worker.precision_warning("bf16", torch.device("cpu"))
    assert warning and "without native bfloat16" in warning and "set train.precision=fp32" in warning
    assert worker.precision_warning("fp32", torch.device("cpu")) is None
    monkeypatch.setattr(worker, "cpu_has_native_bf16", lambda: True)
    assert worker.precision_warning("bf16", torch.device("cpu")) is None


def test_bf16_warns_on_a_gpu_that_emulates_it(monkeypatch):
    """torch.cuda.is_bf16_supported() says True on GPUs before Ampere (T4, V100), which emulate
    bfloat16; only including_emulation=False tells them apart (stood in for here: no GPU in CI)."""
    from rayfine.train import worker

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100, H100
    assert worker.precision_warning("bf16", torch.device("cuda", 0)) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)  # a T4
    warning = worker.precision_warning("bf16", torch.device("cuda", 0))
    assert warning and "GPU without native bfloat16" in warning and "set train.precision=fp32" in warning
    assert worker.precision_warning("fp32", torch.device("cuda", 0)) is None


def test_bf16_support_is_the_cpus_own_and_assumed_when_torch_cannot_say(monkeypatch):
    """On x86, native bfloat16 is AVX512-BF16 or AMX. oneDNN's check says yes for any AVX-512 CPU
    (Skylake-SP to Ice Lake-SP), which emulates it, slower than fp32: no warning was given there."""
    import platform

    from rayfine.train import worker

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    native = (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()) if x86 else (
        torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert worker.cpu_has_native_bf16() is bool(native)
    # An x86 CPU with AVX-512 but neither AVX512-BF16 nor AMX, where oneDNN says it supports bf16:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert worker.cpu_has_native_bf16() is False
    assert worker.precision_warning("bf16", torch.device("cpu")).startswith("warning: train.precision=bf16 on a CPU")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # Sapphire Rapids and later
    assert worker.cpu_has_native_bf16() is True

    def unknown():
        raise AttributeError("_is_avx512_bf16_supported")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", unknown)
    assert worker.cpu_has_native_bf16() is True


# A daemon thread training a small model while the main thread returns, as in a Ray Train worker
# that Ray ends gracefully (its SIGTERM handler raises SystemExit in the main thread). {guard}
# is "ExitGuard()" or "contextlib.nullcontext()"; {check} what the loop calls before each step.
EXITING_PROCESS = """
import contextlib, threading, time
import torch
from rayfine.train.worker import ExitGuard, ProcessExiting

torch.set_num_threads(1)
started = threading.Event()

def loop():
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])
    x = torch.randn(64, 1024)
    with {guard} as guard:
        try:
            while True:
                {check}
                model(x).sum().backward()
                started.set()
        except ProcessExiting:
            print("stopped at a step boundary", flush=True)

threading.Thread(target=loop, daemon=True).start()
started.wait()
time.sleep(0.5)
"""


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "unguarded"])
def test_a_worker_process_that_exits_mid_step_ends_its_training_thread_first(tmp_path, guarded):
    """Without the guard, CPython finalizes while the training thread is in torch's backward
    (without the GIL); taking the GIL back ends the thread with pthread_exit, whose unwinding
    through torch's C++ frames aborts the process (SIGABRT, "terminate called without an active
    exception"). The unguarded case shows the abort that ExitGuard prevents."""
    script = tmp_path / "exiting.py"
    script.write_text(EXITING_PROCESS.format(guard="ExitGuard()" if guarded else "contextlib.nullcontext()",
                                             check="guard.check()" if guarded else "pass"))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    if guarded:
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "stopped at a step boundary"
        assert "terminate called" not in done.stderr and "Fatal Python error" not in done.stderr
    else:
        assert done.returncode != 0 and "terminate called" in done.stderr, (done.returncode, done.stderr[-2000:])


def _pid_logging_loop(config: dict, *, pids_log: str) -> None:
    """The real train loop; each worker first appends its rank and pid to ``pids_log``."""
    import ray.train

    with open(pids_log, "a") as f:
        f.write(json.dumps({"rank": ray.train.get_context().get_world_rank(), "pid": os.getpid()}) + "\n")
    train_loop_per_worker(config)


def test_a_worker_ended_with_sigterm_mid_run_exits_cleanly_and_the_run_resumes(ray_local, tmp_path):
    """SIGTERM is how a process is ended gracefully (`kill`, Kubernetes evicting a pod; a stopped
    trial's worker was seen to exit the same way): Ray's handler raises SystemExit, and the process
    exits while its training thread runs. The worker's log must hold no abort (ExitGuard),
    and the run goes on from its last checkpoint."""
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test files
    cfg = tiny(tmp_path, "sigterm", "train.epochs=5", "train.max_failures=1")
    run_dir, pids_log = tmp_path / "sigterm", tmp_path / "pids.jsonl"
    victim, errors = {}, []

    def killer():
        try:
            wait_for(lambda: epochs_logged(run_dir), 300, 0.05, "epoch 1")
            starts = [json.loads(line) for line in pids_log.read_text().splitlines()]
            victim.update([s for s in starts if s["rank"] == 1][-1])
            os.kill(victim["pid"], signal.SIGTERM)
        except BaseException as e:  # noqa: BLE001 (surfaced below)
            errors.append(e)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = fit(cfg, train_loop=functools.partial(_pid_logging_loop, pids_log=str(pids_log)), log=lambda *_: None)
    thread.join(timeout=60)
    if errors:
        raise errors[0]
    assert epochs_logged(run_dir) == [1, 2, 3, 4, 5]
    starts = [json.loads(line) for line in pids_log.read_text().splitlines()]
    assert [s["rank"] for s in starts].count(0) == 2, starts  # the worker group started again once
    assert summary["eval"]["accuracy"] > 0.5
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    (err,) = logs.glob(f"worker-*-{victim['pid']}.err")
    text = err.read_text()
    assert "Fatal Python error" not in text and "terminate called" not in text, text[-3000:]
