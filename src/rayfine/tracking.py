"""Experiment tracking: MLflow (optional, `tracking.mlflow`) and TensorBoard event files.

    tracker = RunTracker.open(cfg, name="train", tensorboard_dir=run_dir / "train" / "tensorboard")
    tracker.log_epoch({"epoch": 1, "val_accuracy": 0.9, ...})
    tracker.log_evaluation(eval_json); tracker.log_checkpoint(checkpoint_dir); tracker.finish()

A training run is one MLflow run. A search is a parent run with one child run per trial, nested
with MLflow's own ``mlflow.parentRunId`` tag (``SearchTracking``, a Ray Tune callback on the
driver). Everything is logged from the driver through ``MlflowClient`` with explicit run ids, never
through MLflow's process-global "active run", so trials running at the same time cannot log into
each other's runs (the trap Ray's own MLflow callback falls into when trials share a process).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from ray.tune import Callback

from rayfine.config import Config

EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "samples_per_s", "epoch_s")


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.1}} -> {"train.lr": "0.1"} (MLflow params are strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        # Dicts keyed by the user's data (labels in class_weights, search_space's distributions)
        # stay one JSON value: MLflow refuses param names with characters such as "&" or "?".
        if isinstance(v, dict) and v and k not in ("search_space", "class_weights"):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v)
    return out


def _mlflow_client(cfg: Config):
    from mlflow.tracking import MlflowClient

    m = cfg.tracking.mlflow
    client = MlflowClient(tracking_uri=m.tracking_uri)
    name = m.experiment or cfg.name
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return client, experiment.experiment_id
    location = m.artifact_location
    if location is None and m.tracking_uri.startswith("sqlite:///"):
        location = str(Path(m.tracking_uri.removeprefix("sqlite:///")).expanduser().resolve().parent / "mlartifacts")
    return client, client.create_experiment(name, artifact_location=location)


class RunTracker:
    """One run in MLflow (when configured) and one TensorBoard event directory (when enabled)."""

    def __init__(self, client=None, run_id: Optional[str] = None, writer=None):
        self.client, self.run_id, self.writer = client, run_id, writer

    @classmethod
    def open(cls, cfg: Config, *, name: str, tensorboard_dir: Optional[Path], params: Optional[dict] = None,
             parent_run_id: Optional[str] = None, run_id: Optional[str] = None, tags: Optional[dict] = None) -> "RunTracker":
        """Start a run (or reopen ``run_id``, after a resume)."""
        client = writer = None
        if cfg.tracking.mlflow is not None:
            client, experiment_id = _mlflow_client(cfg)
            if run_id is None:
                all_tags = {"rayfine.name": cfg.name, **(tags or {})}
                if parent_run_id:
                    all_tags["mlflow.parentRunId"] = parent_run_id
                run_id = client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id
                _log_params(client, run_id, params if params is not None else flat_params(cfg.to_dict()))
            else:
                client.update_run(run_id, status="RUNNING")
        if cfg.tracking.tensorboard and tensorboard_dir is not None:
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(logdir=str(tensorboard_dir), flush_secs=5)
        return cls(client, run_id, writer)

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        epoch = int(metrics["epoch"])
        values = {k: float(metrics[k]) for k in EPOCH_METRICS if _finite(metrics.get(k))}
        if self.client:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, epoch) for k, v in values.items()])
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, epoch)
            self.writer.flush()

    def log_metrics(self, metrics: dict[str, Any], prefix: str = "") -> None:
        values = {prefix + k: float(v) for k, v in metrics.items() if _finite(v)}
        if self.client:
            for k, v in values.items():
                self.client.log_metric(self.run_id, k, v)
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, 0)
            self.writer.flush()

    def log_evaluation(self, evaluation: dict[str, Any]) -> None:
        """The test evaluation: its headline figures as metrics, eval.json as an artifact."""
        split = evaluation.get("split", "test")
        self.log_metrics({k: evaluation[k] for k in ("accuracy", "macro_f1", "loss")}, prefix=f"{split}_")
        if self.client:
            self.client.log_dict(self.run_id, evaluation, "eval.json")

    def log_checkpoint(self, directory: Path) -> None:
        if self.client:
            self.client.log_artifacts(self.run_id, str(directory), artifact_path="checkpoint")

    def finish(self, status: str = "FINISHED") -> None:
        if self.client:
            self.client.set_terminated(self.run_id, status=status)
        if self.writer:
            self.writer.close()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])


class SearchTracking(Callback):
    """Ray Tune callback (on the driver): a parent run for the search, a nested child per trial.

    The run ids are kept in <run>/tune/tracking.json, so a resumed search (``--resume``) logs into
    the same parent and child runs instead of starting new ones.
    """

    def __init__(self, cfg: Config, keys: list[str]):
        self.cfg, self.keys = cfg, keys
        self.tune_dir = cfg.run_dir() / "tune"
        self.state_path = self.tune_dir / "tracking.json"
        self.trials: dict[str, RunTracker] = {}
        state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.run_ids: dict[str, str] = state.get("trials", {})
        self.parent = RunTracker.open(cfg, name="search", tensorboard_dir=None, run_id=state.get("parent"),
                                      tags={"rayfine.kind": "search"})
        self._save()

    def __reduce__(self):
        # Tune pickles its callbacks into the experiment and a resumed search gets them back from
        # there (as with tune.progress.SearchProgress): let that be the resuming driver's own.
        return (_active_tracking, ())

    @contextlib.contextmanager
    def active(self) -> Iterator["SearchTracking"]:
        global _ACTIVE
        _ACTIVE = self
        try:
            yield self
        finally:
            _ACTIVE = None

    def _save(self) -> None:
        if self.parent.run_id:
            self.tune_dir.mkdir(parents=True, exist_ok=True)
            self.state_path.write_text(json.dumps({"parent": self.parent.run_id, "trials": self.run_ids}))

    def _tracker(self, trial) -> RunTracker:
        tid = trial.trial_id
        if tid not in self.trials:
            sampled = {k: trial.config.get(k) for k in self.keys}
            self.trials[tid] = RunTracker.open(
                self.cfg, name=f"trial_{tid}", tensorboard_dir=self.tune_dir / "tensorboard" / tid,
                params={**flat_params(sampled), "trial_id": tid}, parent_run_id=self.parent.run_id,
                run_id=self.run_ids.get(tid), tags={"rayfine.kind": "trial", "rayfine.trial_id": tid},
            )
            if self.trials[tid].run_id:
                self.run_ids[tid] = self.trials[tid].run_id
                self._save()
        return self.trials[tid]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._tracker(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" in result:
            self._tracker(trial).log_epoch(result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._tracker(trial).finish("FINISHED")
        self.trials.pop(trial.trial_id, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._tracker(trial).finish("FAILED")
        self.trials.pop(trial.trial_id, None)

    def finish(self, summary: Optional[dict], evaluation: Optional[dict], checkpoint: Optional[Path],
               status: Optional[str] = None) -> None:
        """After the search: the parent gets the summary, the winner's test evaluation and checkpoint
        (``status``: how a search that ended without them ended, KILLED or FAILED)."""
        for tracker in self.trials.values():
            tracker.finish("KILLED")
        if summary:
            figures = {k: summary[k] for k in ("num_trials", "epochs_run", "epochs_full_budget", "budget_fraction", "wall_s")}
            self.parent.log_metrics(figures)
            if summary.get("best"):
                self.parent.log_metrics({k: v for k, v in summary["best"].items() if k.startswith("val_")}, prefix="best_")
                if self.parent.client:
                    self.parent.client.set_tag(self.parent.run_id, "rayfine.best_trial", summary["best"]["trial_id"])
        if evaluation:
            self.parent.log_evaluation(evaluation)
        if checkpoint:
            self.parent.log_checkpoint(checkpoint)
        self.parent.finish(status or ("FINISHED" if summary and summary.get("best") else "FAILED"))


_ACTIVE: Optional[SearchTracking] = None


def _active_tracking() -> Callback:
    """What an unpickled SearchTracking becomes: the running search's, else a no-op callback."""
    return _ACTIVE if _ACTIVE is not None else Callback()
