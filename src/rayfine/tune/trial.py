"""One Tune trial = one full training run, built by the same ``build_trainer`` as `rayfine train`.

``run_trial`` runs in the Tune trial actor (0.01 CPU). It builds the trial's config (the search's
base config plus its sampled dotted overrides, validated like any config), then a TorchTrainer
whose ``EpochLog`` records every epoch's rank-0 report (and its ``checkpoint_path``) in the
trial's epochs.jsonl, next to its Train run's checkpoints (every epoch the trial trained, once),
and then has ``TuneReportCallback`` forward it to Tune, so ASHA sees one result per epoch and can
stop the trial. The Train run is named after the trial id under the search's storage, so a run
launched again for the same trial (after a lost node or ``rayfine tune --resume``) continues from
its last checkpoint instead of starting over.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from ray.train import UserCallback

from rayfine.config import Config, parse_search_spec
from rayfine.metrics import json_text, nan_for_null
from rayfine.rundir import append_line, jsonl_records
from rayfine.train.worker import METRIC_KEYS, REPLAYED_FROM  # rayfine.tune.search imports rayfine.train already

EPOCH_LOG = "epochs.jsonl"
STOP_MARK = "stopped_by_asha.json"


def tune_space(search_space: dict[str, Any]) -> dict[str, Any]:
    """The config's search space as Ray Tune domains, keyed by the dotted field."""
    from ray import tune

    make = {
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    space = {}
    for key, spec in search_space.items():
        kind, args = parse_search_spec(spec)
        space[key] = make[kind](args)
    return space


def sampled(config: dict[str, Any], search_space: dict[str, Any]) -> dict[str, Any]:
    """The trial's sampled values as plain Python (Tune may hand out numpy scalars)."""
    return {k: (config[k].item() if hasattr(config[k], "item") else config[k]) for k in search_space if k in config}


def epoch_rows(trial_id: str, params: dict[str, Any], keys: list[str], records: list[dict], status: str) -> list[dict]:
    """A trial's rows of tune/trials.csv: one per epoch of its epoch log (the last report of an epoch
    wins; one row without an epoch when there is none), with its sampled values and ``status``."""
    by_epoch = {int(r["epoch"]): r for r in records}
    base = {"trial_id": trial_id, **sampled(params, keys)}
    return [{**base, **{k: r.get(k) for k in METRIC_KEYS}, "checkpoint_path": r.get("checkpoint_path"), "status": status}
            for r in [by_epoch[e] for e in sorted(by_epoch)] or [{}]]


def trial_config(base: Config, overrides: dict[str, Any]) -> Config:
    """The base config plus sampled ``{dotted.field: value}``, validated like any `--set`."""
    return base.with_overrides([f"{key}={json.dumps(value)}" for key, value in overrides.items()])


def trial_run_name(trial_id: str) -> str:
    return f"trial_{trial_id}"


def epoch_log_path(trials_root: str, trial_id: str) -> str:
    return f"{trials_root}/{trial_run_name(trial_id)}/{EPOCH_LOG}"


@dataclass(frozen=True)
class StopMarks:
    """The trials ASHA stopped, each marked by a file beside its epoch log (``STOP_MARK``) before
    Tune hears the decision. Tune saves its trials' state at most every 10 s, so a driver killed
    just after a stop brings that trial back PENDING on a resume, and ASHA's decision, which depends
    on the order results arrived in, cannot be taken again from the epoch logs: the mark keeps it."""

    trials_root: str

    def _path(self, trial_id: str) -> str:
        return f"{self.trials_root}/{trial_run_name(trial_id)}/{STOP_MARK}"

    def mark(self, trial_id: str, epoch) -> None:
        import pyarrow.fs

        fs, fs_path = pyarrow.fs.FileSystem.from_uri(self._path(trial_id))
        if isinstance(fs, pyarrow.fs.LocalFileSystem):
            os.makedirs(os.path.dirname(fs_path), exist_ok=True)
        with fs.open_output_stream(fs_path) as f:
            f.write(json.dumps({"stopped_after_epoch": epoch}).encode())

    def marked(self, trial_id: str) -> bool:
        import pyarrow.fs

        fs, fs_path = pyarrow.fs.FileSystem.from_uri(self._path(trial_id))
        return fs.get_file_info(fs_path).type != pyarrow.fs.FileType.NotFound


def read_epoch_log(path: str) -> Iterator[dict]:
    """The epochs a trial's Train run reported, in order (local path or storage URI)."""
    import pyarrow.fs

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
    try:
        with fs.open_input_stream(fs_path) as f:
            text = f.read().decode()
    except FileNotFoundError:
        return
    for record in jsonl_records(text, path):
        yield nan_for_null(record, METRIC_KEYS)  # written by json_text: null for a NaN


class EpochLog(UserCallback):
    """Runs on the trial's Train controller: records each epoch's rank-0 report and the path of its
    checkpoint, then hands the epoch on to ``then`` (the trial's ``TuneReportCallback``), so the
    record survives a driver killed at any moment (Tune's own result files lag behind, and start
    afresh on a resume).

    An epoch a resumed run replays (``REPLAYED_FROM``: its checkpoint was registered but the run
    died before this callback ran) is recorded and handed on only if the log lacks it."""

    def __init__(self, path: str, then: UserCallback | None = None):
        self.path = path
        self.then = then

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        import pyarrow.fs

        record = dict(metrics[0])
        replayed = record.pop(REPLAYED_FROM, None)
        if replayed is not None and record["epoch"] in {r["epoch"] for r in read_epoch_log(self.path)}:
            return
        record["checkpoint_path"] = checkpoint.path if checkpoint else replayed
        line = json_text(record)
        fs, fs_path = pyarrow.fs.FileSystem.from_uri(self.path)
        if isinstance(fs, pyarrow.fs.LocalFileSystem):
            os.makedirs(os.path.dirname(fs_path), exist_ok=True)
            append_line(fs_path, line)
        else:  # object stores cannot append: rewrite the (few-line) file
            previous = "".join(json_text(r) + "\n" for r in read_epoch_log(self.path))
            with fs.open_output_stream(fs_path) as f:
                f.write((previous + line + "\n").encode())
        if self.then is not None:
            # With the path in the metrics, as TuneReportCallback passes a checkpoint's on to Tune.
            forwarded = record if record["checkpoint_path"] else {k: v for k, v in record.items() if k != "checkpoint_path"}
            self.then.after_report(run_context, [forwarded], None)


def trial_dirname(trial) -> str:
    # Tune's default folder name lists every sampled value; the id is enough and stays short.
    return trial.trial_id


def run_trial(config: dict, *, base_json: str, datasets: dict, info, shards: dict, storage_path: str,
              driver_dir: str) -> None:
    """The Tune function trainable (runs in the trial actor): one Ray Train run of this trial, on
    the workers' shards split once for all trials on the search's driver (``split_for_workers``:
    every trial has the base config's workers). A sampled local model path is read from
    ``driver_dir``, the directory the search's driver runs in, as the driver's checks read it."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from rayfine.models import absolute_model_paths
    from rayfine.train import build_trainer

    base = Config.model_validate_json(base_json)
    cfg = absolute_model_paths(trial_config(base, sampled(config, base.tune.search_space)), driver_dir)
    trial_id = tune.get_context().get_trial_id()
    trainer = build_trainer(
        cfg, datasets, info,
        shards=shards,
        name=trial_run_name(trial_id),
        storage_path=storage_path,
        callbacks=[EpochLog(epoch_log_path(storage_path, trial_id), then=TuneReportCallback())],
    )
    trainer.fit()
