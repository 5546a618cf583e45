"""What runs on the driver: ``build_trainer`` (also used for every Tune trial) and ``fit``, which
builds the datasets, trains, exports the best epoch, evaluates it on the test split and writes
the run directory (DESIGN.md's contract), with tracking and progress as it goes.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer

from rayfine import checkpoints
from rayfine.config import Config, ConfigError, storage_location, validate, yaml_value
from rayfine.data import DataInfo, build_datasets
from rayfine.data.sources import check_source
from rayfine.errors import DataError, TrainingError
from rayfine.metrics import is_finite_number, json_text, nan_for_null
from rayfine.models import absolute_model_paths, check_model
from rayfine.progress import Progress
from rayfine.rundir import (
    append_line,
    command_config,
    complete_length,
    holding,
    jsonl_records,
    read_saved_config,
    save_config,
    saved_config,
)
from rayfine.tracking import RunTracker, check_mlflow_store, mlflow_target, read_state, reusable_run_id, write_state
from rayfine.train.worker import METRIC_KEYS, REPLAYED_FROM, train_loop_per_worker


def class_weight_vector(cfg: Config, info: DataInfo) -> Optional[list[float]]:
    """train.class_weights as one weight per label id (balanced: n / (k * n_class) on train)."""
    spec = cfg.train.class_weights
    if spec is None:
        return None
    if spec == "balanced":
        counts = np.array([info.class_counts["train"].get(label, 0) for label in info.labels], dtype=float)
        return (counts.sum() / (len(counts) * np.maximum(counts, 1))).tolist()
    unknown = sorted(set(spec) - set(info.labels))
    if unknown:
        raise ConfigError([f"train.class_weights: labels {unknown} are not in the data; labels: {info.labels}"])
    return [float(spec.get(label, 1.0)) for label in info.labels]


class MetricsLog(UserCallback):
    """Appends rank 0's metrics of every epoch to metrics.jsonl (runs on the Train controller,
    which Ray places on the driver's node). An epoch a resumed run replays (``REPLAYED_FROM``) is
    added only if the file lacks it."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        line = {k: metrics[0][k] for k in METRIC_KEYS if k in metrics[0]}
        if REPLAYED_FROM in metrics[0] and line["epoch"] in self._logged_epochs():
            return
        append_line(Path(self.path), json_text(line))

    def _logged_epochs(self) -> set[int]:
        try:
            text = Path(self.path).read_text()
        except FileNotFoundError:
            return set()
        return {record["epoch"] for record in jsonl_records(text, self.path)}


def split_for_workers(cfg: Config, datasets: dict[str, ray.data.Dataset]) -> dict[str, list]:
    """One shard per DDP rank (``cfg.scaling.num_workers``) of the train and val splits, each shard
    the next rows in the dataset's order.

    - train: shards of equal size (``n // num_workers`` rows each; up to ``num_workers - 1`` last
      rows are left out, as Ray Train's own equal split leaves them): every rank must take as many
      optimizer steps. None with ``data.preserve_order: false``: Ray Train then hands blocks out
      as workers ask for them.
    - val: every row, in shards whose sizes differ by at most one, so the validation metrics are
      those of the whole split whatever the number of workers (the loop validates each rank's
      shard without a collective per batch; see ``train_loop_per_worker``).

    Run on the driver before a run starts, while the CPUs are free: a split cuts a block that
    straddles two shards in a Ray task of one CPU, which could wait for a CPU a running run holds.
    A train split of fewer than 2 rows per worker is a DataError: a worker with none takes no
    step (the untrained model would be exported as the best), and one with a single example
    cannot train BatchNorm on it.
    """
    n = cfg.scaling.num_workers
    rows = datasets["train"].count()
    if rows // n < 2:
        raise DataError(f"{cfg.data.source}: the train split has {rows} example(s) for {n} worker(s) "
                        f"(scaling.num_workers); each worker needs at least 2 to train on: lower "
                        f"scaling.num_workers, use more data, or lower data.val_fraction / data.test_fraction")
    val = datasets["val"]
    size, extra = divmod(val.count(), n)
    ends = list(itertools.accumulate([size + 1] * extra + [size] * (n - extra)))
    shards = {"val": val.split_at_indices(ends[:-1]) if n > 1 else val.split(1)}
    if cfg.data.preserve_order:
        shards["train"] = datasets["train"].split(n, equal=True)
    return shards


class ShardedIngest(DataConfig):
    """Ray Train's ingest for the shards of ``split_for_workers``: rank i iterates shard i, the
    same rows in the same order on every run and every epoch, so that with the seeded shuffle
    buffer and augmentation a seed reproduces a run, and a run resumed from a checkpoint trains
    exactly as one that never stopped.

    Ray Train's default ``streaming_split`` gives the same guarantee with ``preserve_order``, but it
    starts a split-coordinator actor per dataset (a new process) and a new Ray Data execution every
    epoch, whose equalizing step waits for a task; the data are materialized already
    (``rayfine.data.build_datasets``), so each worker reads its own blocks instead. A dataset without
    shards for this world size (train with ``data.preserve_order: false``) goes through the default
    ``streaming_split``.

    The options are ``DataConfig.default_ingest_options()``'s, built here: in Ray 2.60 that method
    passes ``exclude_resources`` even when it is unset, and every trial's process then warned that
    the argument is deprecated. An ``exclude_resources`` set on the DataContext is still carried."""

    def __init__(self, cfg: Config, shards: dict[str, list]):
        from ray.data import DataContext, ExecutionOptions

        current = DataContext.get_current().execution_options
        options = ExecutionOptions(resource_limits=current.resource_limits, preserve_order=cfg.data.preserve_order,
                                   verbose_progress=current.verbose_progress)
        if not current.exclude_resources.is_zero():
            options.exclude_resources = current.exclude_resources
        super().__init__(execution_options=options)
        self.shards = shards

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        sharded = {name: self.shards[name] for name in datasets if len(self.shards.get(name, ())) == world_size}
        rest = {name: ds for name, ds in datasets.items() if name not in sharded}
        output = (super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs) if rest
                  else [{} for _ in range(world_size)])
        for name, shards in sharded.items():
            for rank, shard in enumerate(shards):
                shard.context.execution_options = self._resolve_execution_options(name)  # as Ray's configure sets them
                output[rank][name] = shard.iterator()
        return output


class InterruptibleTrainer(TorchTrainer):
    """Ray Train's TorchTrainer, with Ctrl-C as Python has it: ``fit()`` aborts the run and raises
    KeyboardInterrupt, and the caller's SIGINT handler is back after it.

    In the main thread, Ray Train's ``fit()`` installs a SIGINT handler of its own that aborts the
    run and leaves ``fit()`` by SystemExit: `rayfine train` exited 1 with no word, where the README
    promises 130, and a notebook's ``except KeyboardInterrupt`` missed it. The handler also stayed
    installed after ``fit()``, swallowing the caller's next two Ctrl-Cs. Here the handler Ray Train
    registers (``_register_sigint_handler``, called only in the main thread) raises KeyboardInterrupt
    instead, and ``fit()`` aborts the controller as Ray Train's handler does before re-raising it."""

    _controller = None

    def _register_sigint_handler(self, controller) -> None:
        self._controller = controller
        previous = signal.getsignal(signal.SIGINT)

        def interrupt(signum, frame):
            signal.signal(signal.SIGINT, previous)  # a second Ctrl-C while the run aborts is the caller's
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, interrupt)

    def fit(self):
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGINT) if main else None
        try:
            return super().fit()
        except KeyboardInterrupt:
            if self._controller is not None:
                try:  # the controller stops the workers, then exits (RayActorError here)
                    ray.get(self._controller.abort.remote(), timeout=60)
                except ray.exceptions.RayError:  # GetTimeoutError among them
                    pass
            raise
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)


def build_trainer(
    cfg: Config,
    datasets: dict[str, ray.data.Dataset],
    info: DataInfo,
    *,
    name: str = "train",
    storage_path: Optional[str] = None,
    callbacks: Iterable[UserCallback] = (),
    train_loop: Callable[[dict], None] = train_loop_per_worker,
    shards: dict[str, list] | None = None,
) -> TorchTrainer:
    """The TorchTrainer (``InterruptibleTrainer``) for one training run of ``cfg``; the same for `train` and
    every Tune trial.
    ``shards``: ``split_for_workers(cfg, datasets)``, split here when not given."""
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    return InterruptibleTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg.model_dump_json(),
            "labels": info.labels,
            "num_train": info.num_examples["train"],
            "class_weights": class_weight_vector(cfg, info),
        },
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path or cfg.resolved_storage_path(),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=cfg.train.metric,
                checkpoint_score_order=cfg.train.metric_mode,
            ),
            callbacks=list(callbacks),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": datasets["train"], "val": datasets["val"]},
        dataset_config=ShardedIngest(cfg, split_for_workers(cfg, datasets) if shards is None else shards),
    )


def check_resources(cfg: Config, strict: bool = True, log=print) -> None:
    """Refuse (or warn about, on clusters that may autoscale) a run the cluster cannot hold, and say
    when one it can hold waits for CPUs that other work on the same Ray holds now."""
    s = cfg.scaling
    total = ray.cluster_resources()
    need_cpu = s.num_workers * s.cpus_per_worker + s.data_cpus
    problems = []
    if need_cpu > total.get("CPU", 0) + 1e-9:
        problems.append(
            f"needs {need_cpu:g} CPUs ({s.num_workers} workers x {s.cpus_per_worker:g} + {s.data_cpus:g} for Ray Data) "
            f"but the cluster has {total.get('CPU', 0):g}; lower scaling.num_workers, scaling.cpus_per_worker or scaling.data_cpus"
        )
    if s.use_gpu and s.num_workers > total.get("GPU", 0):
        problems.append(f"needs {s.num_workers} GPUs but the cluster has {total.get('GPU', 0):g}; set scaling.use_gpu=false or fewer workers")
    if problems and strict:
        raise ConfigError(problems)
    for p in problems:
        log(f"[warning] {p} (waiting for the cluster to scale up)")
    if not problems and (notice := waiting_for_cpus("train", "the run", need_cpu, total.get("CPU", 0))):
        log(notice)


def waiting_for_cpus(command: str, what: str, need: float, total: float) -> Optional[str]:
    """The line saying that ``what`` (a run, a search's trial), which the cluster's ``total`` CPUs
    hold, waits for CPUs that other work on the same Ray holds now (a Serve app this session
    deployed, another run, a stopped run's placement group): it waits with no word from Ray Train
    or Tune until they are freed. None when ``need`` CPUs are free, or could never be."""
    free = ray.available_resources().get("CPU", 0)
    if need <= free + 1e-9 or need > total + 1e-9:
        return None
    return (f"[{command}] waiting for CPUs: {what} needs {need:g}, and {free:g} of the cluster's {total:g} are free "
            "(other work on this Ray holds the rest: a Serve app, another run; `ray status` shows them)")


def preflight(cfg: Config) -> bool:
    """What `rayfine train` refuses before Ray starts and before the run directory is touched: a
    data.source that does not exist, a model the workers could not build, and another config under
    this run's name, an MLflow store that cannot open. True when the run continues an earlier one
    (``_check_continuation``)."""
    check_source(cfg.data)
    check_model(cfg)
    check_mlflow_store(cfg)
    check_storage(cfg)
    continuing = _check_continuation(cfg.run_dir(), cfg)
    if continuing:
        _check_same_storage(cfg.run_dir(), cfg)
        _check_state_kept(cfg)
    else:
        _check_no_earlier_state(cfg)
    return continuing


def check_storage(cfg: Config) -> None:
    """The run directory and a local storage.storage_path must be creatable by this account: Ray
    Train's controller first writes the storage once the data are read and prepared, and fails
    there with a bare PermissionError or NotADirectoryError that names no field."""
    places = [("storage.runs_dir", cfg.run_dir())]
    if cfg.storage.storage_path and "://" not in cfg.storage.storage_path:
        places.append(("storage.storage_path", Path(cfg.resolved_storage_path())))
    for field, path in places:
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError([f"{field}: {path} cannot be created: {existing} is not a directory"])
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError([f"{field}: {path} cannot be created: this account may not write to {existing}"])
        # An earlier run's folders inside it (train/, tune/best/, Ray Train's train/) are written to as well.
        inside = (d for d in (*path.glob("*"), *path.glob("*/*")) if d.is_dir() and not d.is_symlink())
        locked = next((d for d in inside if not os.access(d, os.W_OK | os.X_OK)), None)
        if locked is not None:
            raise ConfigError([(f"{field}: this account may not write to {locked}, which this run writes to; give it "
                                "write permission (chmod -R u+w), or choose another `name` (--set name=...)")])


def train_state(cfg: Config) -> bool | None:
    """Whether the Ray Train storage of this run holds its checkpoints or their list (an entry
    checkpoint_* under <storage>/train, local or a URI), listed through pyarrow as Ray Train opens
    it; None when the storage cannot be listed now (a bucket without credentials or network: Ray
    Train itself names that when it starts)."""
    import pyarrow
    import pyarrow.fs

    state = cfg.resolved_storage_path().rstrip("/") + "/train"
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(state) if "://" in state else (pyarrow.fs.LocalFileSystem(), state)
        entries = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    except (OSError, ValueError, pyarrow.ArrowException):
        return None
    return any(e.base_name.startswith("checkpoint_") for e in entries)


def _check_no_earlier_state(cfg: Config) -> None:
    """A new training run (no epoch logged in its run directory) whose Ray Train storage already
    holds a run's checkpoints would resume from them (Ray Train restores what it finds under its
    storage), under another config: with a storage.storage_path set, removing the run directory
    leaves that state behind, on a local path or remote storage alike; with the default storage
    (<run>/ray), removing the run's train/ folder does. Only this run killed before its first
    epoch was logged continues: its train/config.yaml, the same config, is still beside them."""
    if not train_state(cfg):
        return
    state = f"{cfg.resolved_storage_path().rstrip('/')}/train"
    if cfg.storage.storage_path:
        raise ConfigError([(
            f"storage.storage_path: {state} holds an earlier run's checkpoints "
            f"of this name, which a new run {cfg.name!r} would resume from; remove that folder, or choose another "
            "`name` (--set name=...)"
        )])
    own = command_config(cfg.run_dir(), "train")
    changed = changes_since(own, cfg, RESUMABLE_CHANGES) if own.is_file() else None
    if changed == []:
        return
    why = (f"of a different config (changed: {', '.join(changed)})" if changed
           else f"whose {cfg.run_dir() / 'train'} folder is gone")
    raise ConfigError([(
        f"{state} holds the checkpoints of an earlier run {why}, which a new run {cfg.name!r} would resume from "
        f"(Ray Train restores them); remove {cfg.resolved_storage_path().rstrip('/')} to train from the start, or "
        "choose another `name` (--set name=...)"
    )])


def _check_state_kept(cfg: Config) -> None:
    """A run that continues needs its checkpoints: where Ray Train's storage lost them (removed by
    hand, another machine's local storage), Ray Train starts again from epoch 1 while metrics.jsonl
    already holds the epochs trained before, and every one of them would be logged twice."""
    metrics = cfg.run_dir() / "train" / "metrics.jsonl"
    logged = len(jsonl_records(metrics.read_text(), metrics))
    if logged and train_state(cfg) is False:
        raise ConfigError([(
            f"{cfg.run_dir()} holds {logged} trained epoch(s) of this run, but its checkpoints under "
            f"{cfg.resolved_storage_path().rstrip('/')}/train are gone, so it cannot continue (Ray Train would "
            f"train again from epoch 1 and log those epochs twice); remove {cfg.run_dir()} to train it from the "
            "start, or choose another `name` (--set name=...)"
        )])


# tune.*: only `rayfine tune` reads them; serve.*: the exported checkpoint takes the continuing run's
# (``export_best``), which `rayfine serve` deploys with. scaling.num_workers changes the
# steps per epoch: the worker continues the LR schedule by epoch (``model_and_optimizer``).
# storage.storage_path may not change under a training run that continues (``_check_same_storage``).
RESUMABLE_CHANGES = ("train.max_failures", "scaling.", "storage.", "tracking.", "tune.", "serve.")


def _check_continuation(run_dir: Path, cfg: Config) -> bool:
    """True when this run continues an earlier training run. Refuse a config that changed what
    is trained from the training run's or the search's in ``run_dir`` (one name, one experiment)."""
    done = {"train": (run_dir / "train" / "metrics.jsonl").is_file(), "tune": command_config(run_dir, "tune").is_file()}
    for command, what in (("train", "run"), ("tune", "search")):
        previous = saved_config(run_dir, command)
        changed = changes_since(previous, cfg, RESUMABLE_CHANGES) if done[command] and previous.is_file() else []
        if changed:
            state = storage_location(cfg.storage.storage_path, run_dir, run_dir.name)
            also = "" if state.startswith(str(run_dir) + "/") else f" and {state} (its Ray state)"
            raise ConfigError(
                [f"{run_dir} holds a {what} of a different config (changed: {', '.join(changed)}); "
                 f"choose another `name` (or --set name=...) or remove that directory{also}"
                 + (_train_on_hint(run_dir, cfg) if command == "train" else "")]
            )
    return done["train"] and saved_config(run_dir, "train").is_file()


def _train_on_hint(run_dir: Path, cfg: Config) -> str:
    """How a new run starts from a finished run's model (more epochs, another learning rate): its
    checkpoint's weights for torchvision and EfficientNet-Lite0, the checkpoint itself (a Hugging
    Face model directory) for Hugging Face models."""
    checkpoint = run_dir / "train" / "checkpoint"
    if not checkpoint.is_dir():
        return ""
    weights_file = cfg.model.is_torchvision or cfg.model.is_efficientnet
    start = f"model.weights={checkpoint / 'model.safetensors'}" if weights_file else f"model.name={checkpoint}"
    return f"; to train on from its model in a new run: --set name=... --set {start}"


def _storage_of(storage_path: str | None, run_dir: Path) -> str:
    """Where a training run under ``run_dir`` keeps Ray Train's state with this storage.storage_path
    (``Config.resolved_storage_path``, for a config whose run directory is ``run_dir``)."""
    return storage_location(storage_path, run_dir, run_dir.name)


def saved_storage_path(run_dir: Path, command: str) -> str | None:
    """The storage.storage_path of the config `rayfine train` or `tune` saved in ``run_dir``."""
    previous = read_saved_config(saved_config(run_dir, command))
    return (previous.get("storage") if isinstance(previous.get("storage"), dict) else {}).get("storage_path")


def _check_same_storage(run_dir: Path, cfg: Config) -> None:
    """Refuse to continue the training run in ``run_dir`` with another storage.storage_path: Ray
    Train resumes from the checkpoints under the storage path, so under a new one the run would
    start again from epoch 1 while its metrics.jsonl already holds the epochs trained before."""
    old = saved_storage_path(run_dir, "train")
    new = cfg.storage.storage_path
    if _storage_of(old, run_dir) != _storage_of(new, run_dir):
        back = f"set storage.storage_path back to {old}" if old else "unset storage.storage_path again"
        raise ConfigError([(
            f"storage.storage_path changed from {yaml_value(old)} to {yaml_value(new)}: {run_dir} holds a training "
            f"run whose checkpoints are under {_storage_of(old, run_dir)}, and under {_storage_of(new, run_dir)} it "
            f"would start again from epoch 1. To continue it, {back}; to train with the new storage, choose another "
            "`name` (or --set name=...) or remove that directory"
        )])


def changes_since(previous_path: Path, cfg: Config, allowed: tuple[str, ...]) -> list[str]:
    """The dotted keys in which ``cfg`` differs from the config saved at ``previous_path``, apart
    from those under the ``allowed`` prefixes."""
    previous = read_saved_config(previous_path)
    try:  # validated, so fields added to rayfine since that run compare as their defaults
        previous = validate(previous).to_dict()
    except ConfigError:
        pass
    return [k for k in _diff(previous, cfg.to_dict()) if not k.startswith(allowed)]


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _ctrl_c_to_main() -> None:
    """Ctrl-C's SIGINT, to the main thread, where fit() waits on Ray Train: it wakes there and is
    interrupted (InterruptibleTrainer)."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def _follow(path: Path, stop: threading.Event, on_line: Callable[[dict], None], offset: int = 0,
            on_reader_gone: Callable[[], None] | None = None) -> None:
    """Calls ``on_line`` with each record appended to ``path`` after its first ``offset`` bytes, until
    ``stop`` is set (the records appended by then included). Where the epoch lines can no longer be
    shown (the reader of a pipe went away: `rayfine train ... | head`), it stops and calls
    ``on_reader_gone`` (``_ctrl_c_to_main``: the run stops as Ctrl-C stops it, not trained on unseen)."""
    while True:
        done = stop.is_set()
        if path.exists():
            with path.open() as f:
                f.seek(offset)
                for line in f:
                    if line.endswith("\n"):
                        offset += len(line)
                        try:
                            on_line(nan_for_null(json.loads(line), METRIC_KEYS))  # null: a NaN or infinity
                        except BrokenPipeError:
                            if on_reader_gone is not None:
                                on_reader_gone()
                            return
        if done:
            return
        stop.wait(0.5)


def format_epoch(m: dict, epochs: int) -> str:
    return (
        f"[train] epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}  "
        f"val_acc {m['val_accuracy']:.4f}  val_f1 {m['val_macro_f1']:.4f}  {m['samples_per_s']:.0f} samples/s  {m['epoch_s']:.1f}s"
    )


def fit(
    cfg: Config,
    *,
    datasets: Optional[dict[str, ray.data.Dataset]] = None,
    info: Optional[DataInfo] = None,
    train_loop: Callable[[dict], None] = train_loop_per_worker,
    strict_resources: bool = True,
    log=print,
) -> dict[str, Any]:
    """Train ``cfg`` and write its run directory; returns {"best": metrics, "eval": test metrics, ...}.

    Needs a connected Ray (``rayfine.runtime.ray_session``). Running it again with the same
    ``name`` continues the run from its last checkpoint. It holds the run directory while it runs
    (``rayfine.rundir``): another ``fit``, `rayfine train`, `tune` or `run` on it raises RunDirBusy.
    """
    continuing = preflight(cfg)
    with holding(cfg.run_dir(), "train"):
        return _fit(cfg, continuing, datasets=datasets, info=info, train_loop=train_loop,
                    strict_resources=strict_resources, log=log)


def _fit(cfg: Config, continuing: bool, *, datasets: dict[str, ray.data.Dataset] | None, info: DataInfo | None,
         train_loop: Callable[[dict], None], strict_resources: bool, log) -> dict[str, Any]:
    from rayfine.evaluate import evaluate_checkpoint

    run_dir, started = cfg.run_dir(), time.time()
    # Up front: a plan that does not fit is refused before the data are read and prepared and
    # before the run directory is written to.
    check_resources(cfg, strict=strict_resources, log=log)
    train_dir = run_dir / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    save_config(run_dir, "train", cfg.to_yaml())
    metrics_path = train_dir / "metrics.jsonl"
    if continuing and metrics_path.exists():
        done = len(jsonl_records(metrics_path.read_text(), metrics_path))
        log(f"[train] continuing {run_dir} after {done} finished epoch(s)")
    if datasets is None or info is None:
        datasets, info = build_datasets(cfg, log=log)

    # The workers run in directories of their own: they get local model paths made absolute (the
    # run directory keeps the config as given, which a continued run is compared with).
    trainer = build_trainer(absolute_model_paths(cfg), datasets, info, callbacks=[MetricsLog(str(metrics_path))],
                            train_loop=train_loop)
    log(f"[train] {cfg.model.name} on {cfg.scaling.num_workers} DDP worker(s), {cfg.train.epochs} epoch(s) -> {run_dir}")
    tracker = _open_tracker(cfg, train_dir, continuing)
    done = len(jsonl_records(metrics_path.read_text(), metrics_path)) if metrics_path.exists() else 0
    progress = Progress(total=cfg.train.epochs, desc="epochs", log=log, initial=min(done, cfg.train.epochs))

    def on_epoch(m: dict) -> None:
        progress.line(format_epoch(m, cfg.train.epochs))
        progress.advance(postfix=f"{cfg.train.metric} {m[cfg.train.metric]:.4f}")
        tracker.log_epoch(m)

    stop = threading.Event()
    # From the end of the epochs logged before (a line cut short is replaced there: append_line).
    offset = complete_length(metrics_path) if metrics_path.exists() else 0
    in_main = threading.current_thread() is threading.main_thread()  # else no Ctrl-C handler of ours waits
    follower = threading.Thread(target=_follow, args=(metrics_path, stop, on_epoch, offset,
                                                      _ctrl_c_to_main if in_main else None), daemon=True)
    follower.start()
    try:
        try:
            result = trainer.fit()
        except Exception as e:  # Ray wraps worker errors; keep the first line readable
            raise TrainingError(f"training failed: {_first_line(e)}") from e
        finally:
            stop.set()
            follower.join()
            progress.close()
        if result.error:
            raise TrainingError(f"training failed: {_first_line(result.error)}")

        best_ckpt, best_metrics = _best(result, cfg)
        exported = export_best(best_ckpt, train_dir / "checkpoint", cfg)
        log(f"[train] best epoch {best_metrics['epoch']} ({cfg.train.metric} {best_metrics[cfg.train.metric]:.4f}) -> {exported}")
        evaluation = evaluate_checkpoint(exported, datasets["test"], train_dir, log=log,
                                         num_samples=info.num_examples["test"])
        from rayfine.report import train_report

        log(f"[train] report: {train_report(run_dir)}")
        tracker.log_evaluation(evaluation)
        tracker.log_checkpoint(exported)
    except BaseException as e:
        # MLflow's statuses: KILLED for a run the user stopped (Ctrl-C), as the search's runs end.
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    tracker.finish()
    return {
        "run_dir": str(run_dir),
        "checkpoint": str(exported),
        "best": best_metrics,
        "eval": evaluation,
        "data": info.to_dict(),
        "wall_s": time.time() - started,
    }


def _open_tracker(cfg: Config, train_dir: Path, continuing: bool) -> RunTracker:
    """The run's MLflow run (the same one again when the run continues) and TensorBoard events."""
    state = train_dir / "tracking.json"
    run_id = reusable_run_id(cfg, read_state(state), "run_id") if continuing else None
    tracker = RunTracker.open(cfg, name="train", tensorboard_dir=train_dir / "tensorboard", run_id=run_id,
                              tags={"rayfine.kind": "train"})
    if tracker.run_id:
        write_state(state, {**mlflow_target(cfg), "run_id": tracker.run_id})
    return tracker


def export_best(checkpoint: Checkpoint, destination: Path, cfg: Config) -> Path:
    """Export a Ray Train checkpoint's inference files to ``destination``, with ``cfg``'s serve
    section (what `rayfine serve` and `rayfine run` deploy it with). With remote storage
    (storage.storage_path s3://...), ``checkpoint.path`` is a path inside that filesystem, not a
    local one: ``as_directory`` gives the local directory itself or downloads the checkpoint to a
    temporary one, removed afterwards."""
    with checkpoint.as_directory() as local:
        return checkpoints.export_checkpoint(local, destination, serve=cfg.serve)


def _best(result, cfg: Config) -> tuple[Checkpoint, dict]:
    """The kept checkpoint with the best ``train.metric``, ties to the later epoch. A NaN (a diverged
    epoch) is never the best: Ray ranks it below every number but lists it first when loss is minimized."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if c is not None]
    if not candidates:
        raise TrainingError("training finished without a checkpoint")
    metric = cfg.train.metric
    candidates = [(c, m) for c, m in candidates if is_finite_number(m.get(metric))]
    if not candidates:
        raise TrainingError(f"no kept checkpoint has a finite {metric} (training diverged?); "
                            "try a lower train.lr, or keep more checkpoints (train.keep_checkpoints)")
    sign = 1 if cfg.train.metric_mode == "max" else -1
    return max(candidates, key=lambda cm: (sign * cm[1][cfg.train.metric], cm[1]["epoch"]))


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    # Ray's wrapped errors end with the worker's exception; that is the useful line.
    return lines[-1] if lines else type(error).__name__
