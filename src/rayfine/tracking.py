"""Experiment tracking: MLflow (optional, `tracking.mlflow`) and TensorBoard event files.

    tracker = RunTracker.open(cfg, name="train", tensorboard_dir=run_dir / "train" / "tensorboard")
    tracker.log_epoch({"epoch": 1, "val_accuracy": 0.9, ...})
    tracker.log_evaluation(eval_json); tracker.log_checkpoint(checkpoint_dir); tracker.finish()

A training run is one MLflow run. A search is a parent run with one child run per trial, nested
with MLflow's own ``mlflow.parentRunId`` tag (``SearchTracking``, a Ray Tune callback on the
driver). Everything is logged from the driver through ``MlflowClient`` with explicit run ids, never
through MLflow's process-global "active run", so trials running at the same time cannot log into
each other's runs (the trap Ray's own MLflow callback falls into when trials share a process).

Tracking never stops the work it tracks: every MLflow call goes through a ``_Guard``, which on the
first error prints one warning line and turns MLflow off for the rest of the run (a search's
parent and trials share one), while TensorBoard goes on; ``finish`` never raises. Artifacts
(eval.json, the checkpoint) go to the experiment's artifact store, another system than the
tracking store: a failed upload turns only artifact logging off. ``finish`` ends every run that
was started, even once an error turned MLflow off (as MLflow's own ``with start_run()`` does),
unless the tracking server was unreachable. A ``file:`` or plain-path tracking URI is refused up front
(``check_mlflow_store``): MLflow's file store refuses to start unless MLFLOW_ALLOW_FILE_STORE=true.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Iterator, Optional

from ray.tune import Callback

from rayfine.config import Config, ConfigError
from rayfine.config.sections import redact_url_passwords as _redact  # one definition, report.py's too
from rayfine.metrics import METRIC_KEYS, finite_or_none

EPOCH_METRICS = tuple(k for k in METRIC_KEYS if k != "epoch")  # the epoch is each value's step


def _warn(text: str) -> None:
    print(f"[tracking] warning: {text}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = _redact(f"{type(e).__name__}: {text[0]}" if text else type(e).__name__)
    return line if len(line) <= 300 else line[:297] + "..."


class _Guard:
    """Calls into one tracking backend (MLflow at ``where``, or a TensorBoard directory): the first
    that raises prints one warning line and turns the backend off for the rest of the run, so an
    unreachable server or a broken store never ends a search or a training run, never kills the
    thread that follows the epochs, and never replaces the error a failed run is raising."""

    def __init__(self, backend: str, where: str, what_off: str = ""):
        self.backend, self.where, self.off = backend, where, False
        self.what_off = what_off or f"{backend} logging is off for the rest of this run; training continues."
        self.unreachable = False  # the server did not answer: another call would wait out its retries again
        self._lock = threading.Lock()

    def call(self, what: str, fn: Callable, *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)``, or None when the backend is off or the call fails."""
        if self.off:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any error of a tracking backend turns it off
            self.fail(what, e)
            return None

    def fail(self, what: str, e: BaseException) -> None:
        with self._lock:
            if self.off:
                return
            self.off = True
            self.unreachable = _unreachable(e)
        _warn(f"{self.backend}: {what} failed at {self.where}: {_first_line(e)} -- {self.what_off}")

    def end(self, what: str, fn: Callable, *args, **kwargs) -> None:
        """``fn(*args, **kwargs)``, which ends a run: through ``call`` while the backend is on; once it
        is off, still tried once (a started run left RUNNING shows as running for good), unless the
        server was unreachable. Its error is a warning line."""
        if not self.off:
            self.call(what, fn, *args, **kwargs)
            return
        if self.unreachable:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the work it tracks is over or raising its own error
            self.unreachable = self.unreachable or _unreachable(e)
            _warn(f"{self.backend}: {what} failed at {self.where}: {_first_line(e)} -- it may still show as "
                  "RUNNING there.")


def _unreachable(e: BaseException | None) -> bool:
    """Whether ``e`` came from a connection that failed (refused, timed out, retries exhausted):
    MLflow raises those as MlflowException, from requests' errors, which are OSErrors."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _note(text: str) -> None:
    print(f"[tracking] {text}", file=sys.stderr, flush=True)


def flat_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.1}} -> {"train.lr": "0.1"} (MLflow params are strings), URL passwords
    masked (everyone who reads the experiment reads its params)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        # Dicts keyed by the user's data (labels in class_weights, search_space's distributions)
        # stay one JSON value: MLflow refuses param names with characters such as "&" or "?".
        if isinstance(v, dict) and v and k not in ("search_space", "class_weights"):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = _param_value(v)
    return out


def _param_value(v: Any) -> str:
    return _redact(json.dumps(v) if isinstance(v, (dict, list, tuple)) else str(v))


def mlflow_target(cfg: Config) -> dict[str, str]:
    """Where ``cfg`` logs to MLflow, as saved beside run ids in tracking.json ({} without MLflow);
    the URI without its password."""
    m = cfg.tracking.mlflow
    return {} if m is None else {"tracking_uri": _redact(m.tracking_uri), "experiment": m.experiment or cfg.name}


def read_state(path: Path) -> dict[str, Any]:
    """A tracking.json: {} when there is none, or (with a warning) when it cannot be read."""
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
        if isinstance(state, dict):
            return state
        problem = "not a JSON object"
    except (OSError, ValueError) as e:
        problem = _first_line(e)
    _warn(f"cannot read {path} ({problem}): ignoring it; MLflow logging starts a new run.")
    return {}


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write a tracking.json whole or not at all (``write_atomic``)."""
    from rayfine.rundir import write_atomic

    write_atomic(path, json.dumps(state))


def reusable_run_id(cfg: Config, state: dict[str, Any], key: str) -> str | None:
    """The run id ``state[key]`` when it was saved for ``cfg``'s MLflow tracking URI and experiment
    (a tracking.json from before they were saved counts as theirs: ``RunTracker.open`` still checks
    that the run is there); else None, with one line saying a new run starts. URIs are compared
    without their passwords (a tracking.json of older rayfine versions holds the password too)."""
    run_id = state.get(key)
    if not isinstance(run_id, str) or not run_id:
        return None
    target = mlflow_target(cfg)
    if not target:
        return None
    changed = [k for k, v in target.items() if k in state and _redact(str(state[k])) != v]
    if changed:
        was = ", ".join(f"{k} {_redact(str(state[k]))}" for k in changed)
        _note(f"MLflow run {run_id} was logged with {was}: starting a new run.")
        return None
    return run_id


# Tracking URIs without a scheme that are not paths: MLflow's REST stores (as its store registry maps them).
MLFLOW_PLAIN_STORES = ("databricks", "databricks-uc", "uc")


def check_mlflow_store(cfg: Config) -> None:
    """Refuse a tracking.mlflow.tracking_uri of MLflow's file store (``./mlruns``, ``file:///...``):
    MLflow 3 refuses to open it unless MLFLOW_ALLOW_FILE_STORE=true, so nothing would be logged.
    Checked on the driver, in its environment (MLflow is used there only), not when the config is
    validated: the workers validate it again, in environments that may not set the variable."""
    from urllib.parse import urlsplit

    m = cfg.tracking.mlflow
    if m is None or urlsplit(m.tracking_uri).scheme not in ("", "file") or m.tracking_uri in MLFLOW_PLAIN_STORES:
        return
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:  # an MLflow from before the file store was gated opens it
        return
    try:
        if MLFLOW_ALLOW_FILE_STORE.get():
            return
        why = "MLflow refuses to open its file store unless the environment sets MLFLOW_ALLOW_FILE_STORE=true"
    except ValueError:  # MLflow raises it for a value other than true/false/1/0
        why = f"MLFLOW_ALLOW_FILE_STORE={os.environ.get('MLFLOW_ALLOW_FILE_STORE')!r} is not true, false, 1 or 0"
    raise ConfigError([(f"tracking.mlflow.tracking_uri {_redact(m.tracking_uri)}: {why}; use a sqlite store "
                        "(sqlite:///runs/mlflow.db) or an MLflow server, or set MLFLOW_ALLOW_FILE_STORE=true")])


def _mlflow_client(cfg: Config):
    from mlflow.exceptions import MlflowException
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
    try:
        return client, client.create_experiment(name, artifact_location=location)
    except MlflowException as e:
        # Another command (a training run beside a search) created it since the lookup above.
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return client, experiment.experiment_id


def _why_not_reuse(client, run_id: str, experiment_id: str) -> str | None:
    """Why the MLflow run ``run_id`` cannot be continued in ``experiment_id`` (None: it can)."""
    from mlflow.exceptions import MlflowException

    try:
        info = client.get_run(run_id).info
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return "is not in this tracking store"
        raise
    if info.lifecycle_stage != "active":
        return "was deleted"
    if info.experiment_id != experiment_id:
        return f"belongs to another experiment (id {info.experiment_id})"
    return None


def _start_run(cfg: Config, client, experiment_id: str, *, name: str, parent_run_id: str | None,
               run_id: str | None, tags: dict | None) -> str:
    """``run_id`` again (RUNNING) where it can be continued, else a new run's id."""
    if run_id is not None:
        why = _why_not_reuse(client, run_id, experiment_id)
        if why is None:
            client.update_run(run_id, status="RUNNING")
            return run_id
        _note(f"MLflow run {run_id} {why} ({_redact(cfg.tracking.mlflow.tracking_uri)}): starting a new run.")
    all_tags = {"rayfine.name": cfg.name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id


class RunTracker:
    """One run in MLflow (when configured) and one TensorBoard event directory (when enabled).

    No method raises for a tracking error: the first one turns that backend off (``_Guard``); a
    failed artifact upload turns off artifact logging only (``artifacts``)."""

    def __init__(self, client=None, run_id: Optional[str] = None, writer=None, guard: _Guard | None = None,
                 tensorboard: _Guard | None = None):
        self.client, self.run_id, self.writer = client, run_id, writer
        self.guard = guard or _Guard("MLflow", _redact(str(getattr(client, "tracking_uri", "?"))))
        self.artifacts = _Guard("MLflow", self.guard.where, "MLflow artifact logging is off for the rest of this "
                                "run; its metrics are still logged and the run is ended.")
        self.tensorboard = tensorboard or _Guard("TensorBoard", str(getattr(writer, "logdir", "?")))

    @classmethod
    def open(cls, cfg: Config, *, name: str, tensorboard_dir: Optional[Path], params: Optional[dict] = None,
             parent_run_id: Optional[str] = None, run_id: Optional[str] = None, tags: Optional[dict] = None,
             guard: _Guard | None = None) -> "RunTracker":
        """Start a run (or reopen ``run_id``, after a resume, when that run is in this tracking
        store and experiment; else a new one). ``guard``: shared by the runs of one search, so that
        MLflow's first error turns it off for all of them. A run started before an error (its params
        failed) is kept, for ``finish`` to end it."""
        client = writer = started = None
        tensorboard = _Guard("TensorBoard", str(tensorboard_dir))
        if cfg.tracking.mlflow is not None:
            guard = guard or _Guard("MLflow", _redact(cfg.tracking.mlflow.tracking_uri))
            opened = guard.call("opening the experiment", _mlflow_client, cfg)
            if opened is not None:
                client, experiment_id = opened
                started = guard.call("starting the run", _start_run, cfg, client, experiment_id, name=name,
                                     parent_run_id=parent_run_id, run_id=run_id, tags=tags)
            if started is not None and started != run_id:  # a new run
                guard.call("logging the params", _log_params, client, started,
                           params if params is not None else flat_params(cfg.to_dict()))
            if started is None:
                client = None
        if cfg.tracking.tensorboard and tensorboard_dir is not None:
            from tensorboardX import SummaryWriter

            writer = tensorboard.call("opening the event file", SummaryWriter, logdir=str(tensorboard_dir), flush_secs=5)
        return cls(client, started, writer, guard, tensorboard)

    def _mlflow(self, what: str, method: str, *args, **kwargs) -> None:
        if self.client is not None and self.run_id is not None:
            self.guard.call(what, lambda: getattr(self.client, method)(self.run_id, *args, **kwargs))

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None and values:
            def write():
                for k, v in values.items():
                    self.writer.add_scalar(k, v, step)
                self.writer.flush()

            self.tensorboard.call("writing scalars", write)

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        epoch = int(metrics["epoch"])
        # NaN and inf too (a diverged epoch shows): MLflow takes them (its SQL stores keep inf as
        # the largest float), TensorBoard too.
        values = {k: float(metrics[k]) for k in EPOCH_METRICS if _number(metrics.get(k))}
        if self.client is not None and values:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._mlflow(f"logging epoch {epoch}", "log_batch", metrics=[Metric(k, v, now, epoch) for k, v in values.items()])
        self._scalars(values, epoch)

    def log_metrics(self, metrics: dict[str, Any], prefix: str = "") -> None:
        values = {prefix + k: float(v) for k, v in metrics.items() if _number(v)}
        for k, v in values.items():
            self._mlflow(f"logging {k}", "log_metric", k, v)
        self._scalars(values, 0)

    def log_evaluation(self, evaluation: dict[str, Any]) -> None:
        """The test evaluation: its headline figures as metrics, eval.json as an artifact."""
        split = evaluation.get("split", "test")
        self.log_metrics({k: evaluation[k] for k in ("accuracy", "macro_f1", "loss") if k in evaluation}, prefix=f"{split}_")
        # As the run directory's eval.json: null for a NaN or infinity (strict JSON).
        self._artifact("logging eval.json", "log_dict", finite_or_none(evaluation), "eval.json")

    def log_checkpoint(self, directory: Path) -> None:
        self._artifact("logging the checkpoint", "log_artifacts", str(directory), artifact_path="checkpoint")

    def _artifact(self, what: str, method: str, *args, **kwargs) -> None:
        """An upload to the experiment's artifact store (S3 without boto3, no credentials, a full
        disk): its failure turns off artifact logging only, not the metrics or ``finish``."""
        if self.client is not None and self.run_id is not None and not self.guard.off:
            self.artifacts.call(what, lambda: getattr(self.client, method)(self.run_id, *args, **kwargs))

    def set_tag(self, key: str, value: str) -> None:
        self._mlflow(f"setting tag {key}", "set_tag", key, value)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as ``status``, even after an error turned MLflow off (``_Guard.end``); never
        raises (it runs while a failed run raises its error)."""
        if self.client is not None and self.run_id is not None:
            self.guard.end(f"ending the run as {status}", self.client.set_terminated, self.run_id, status=status)
        if self.writer is not None:
            self.tensorboard.call("closing the event file", self.writer.close)


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])


class SearchTracking(Callback):
    """Ray Tune callback (on the driver): a parent run for the search, a nested child per trial.

    The run ids are kept in <run>/tune/tracking.json with the tracking URI and experiment they were
    logged to, so a resumed search (``--resume``) logs into the same parent and child runs instead
    of starting new ones (new ones when tracking.mlflow changed or the runs are gone). A new search
    (``resume`` false) starts new runs whatever an earlier search's tracking.json says.
    """

    def __init__(self, cfg: Config, keys: list[str], resume: bool = True):
        self.cfg, self.keys = cfg, keys
        self.tune_dir = cfg.run_dir() / "tune"
        self.state_path = self.tune_dir / "tracking.json"
        self.trials: dict[str, RunTracker] = {}
        m = cfg.tracking.mlflow
        self.guard = _Guard("MLflow", _redact(m.tracking_uri)) if m is not None else None
        state = read_state(self.state_path) if resume else {}
        parent = reusable_run_id(cfg, state, "parent")
        trials = state.get("trials") if parent else None
        self.run_ids: dict[str, str] = {}
        if isinstance(trials, dict):
            self.run_ids = {k: v for k, v in trials.items() if isinstance(v, str)}
        self.parent = RunTracker.open(cfg, name="search", tensorboard_dir=None, run_id=parent,
                                      tags={"rayfine.kind": "search"}, guard=self.guard)
        if self.parent.run_id != parent:  # a new parent run: its trials are new runs too
            self.run_ids = {}
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
            state = {**mlflow_target(self.cfg), "parent": self.parent.run_id, "trials": self.run_ids}
            try:
                write_state(self.state_path, state)
            except OSError as e:  # a resumed search would start new runs; this one goes on
                _warn(f"cannot write {self.state_path}: {_first_line(e)}")

    def _tracker(self, trial) -> RunTracker:
        tid = trial.trial_id
        if tid not in self.trials:
            sampled = {k: trial.config.get(k) for k in self.keys}
            self.trials[tid] = RunTracker.open(
                self.cfg, name=f"trial_{tid}", tensorboard_dir=self.tune_dir / "tensorboard" / tid,
                # Keyed by dotted field names already: a sampled mapping (train.class_weights) stays one value.
                params={**{k: _param_value(v) for k, v in sampled.items()}, "trial_id": tid},
                parent_run_id=self.parent.run_id,
                run_id=self.run_ids.get(tid), tags={"rayfine.kind": "trial", "rayfine.trial_id": tid},
                guard=self.guard,
            )
            if self.trials[tid].run_id and self.run_ids.get(tid) != self.trials[tid].run_id:
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
                self.parent.set_tag("rayfine.best_trial", summary["best"]["trial_id"])
        if evaluation:
            self.parent.log_evaluation(evaluation)
        if checkpoint:
            self.parent.log_checkpoint(checkpoint)
        self.parent.finish(status or ("FINISHED" if summary and summary.get("best") else "FAILED"))


_ACTIVE: Optional[SearchTracking] = None


def _active_tracking() -> Callback:
    """What an unpickled SearchTracking becomes: the running search's, else a no-op callback."""
    return _ACTIVE if _ACTIVE is not None else Callback()
