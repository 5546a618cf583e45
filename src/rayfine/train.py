"""Distributed fine-tuning with Ray Train (PyTorch DDP).

    from rayfine.config import load_config
    from rayfine.train import fit
    summary = fit(load_config("resnet18_digits"))      # inside ray.init() / rayfine.runtime.ray_session

Named by where the code runs:
- ``train_loop_per_worker`` runs in every DDP worker: its shard of the data, the model, one
  validation and one checkpoint per epoch, resume from ``ray.train.get_checkpoint()``.
- ``build_trainer`` makes the ``TorchTrainer``; ``rayfine.tune`` calls it for every trial.
- ``fit`` runs on the driver: datasets, trainer, the run directory, the final test evaluation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file

from rayfine import checkpoints, metrics
from rayfine.config import Config, ConfigError
from rayfine.data import DataInfo, build_datasets
from rayfine.errors import TrainingError
from rayfine.models import model_for_config

METRIC_KEYS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "samples_per_s", "epoch_s")


# --- on every worker ------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    # No weight decay on biases and norm parameters (the usual fine-tuning practice).
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.momentum > 0)
    return torch.optim.AdamW(groups, lr=t.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int):
    """Linear warmup, then cosine decay to zero (or constant)."""
    warmup = int(cfg.train.warmup_fraction * total_steps)
    cosine = cfg.train.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if not cosine:
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _with_last(items: Iterable) -> Iterator[tuple[Any, bool]]:
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


def _all_reduce_sum(values: np.ndarray, device: torch.device) -> np.ndarray:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def train_loop_per_worker(config: dict) -> None:
    """One DDP worker: config = {"cfg": <Config JSON>, "labels": [...], "num_train": int}."""
    cfg = Config.model_validate_json(config["cfg"])
    # Ray sets the worker's root logger to INFO; its per-report lines would drown our epoch lines.
    logging.getLogger().setLevel(logging.WARNING)
    labels: list[str] = config["labels"]
    num_labels = len(labels)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed + rank)

    model = model_for_config(cfg, num_labels)
    start_epoch = 1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_file(str(Path(d) / checkpoints.MODEL_FILE)))
    model = ray.train.torch.prepare_model(model)
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)

    t = cfg.train
    rows_per_worker = config["num_train"] // world  # streaming_split(equal=True) gives each the same
    batches_per_epoch = max(1, math.ceil(rows_per_worker / t.batch_size))
    steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum_steps)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch * t.epochs)
    if checkpoint:
        with checkpoint.as_directory() as d:
            start_epoch = checkpoints.load_train_state(d, optimizer, scheduler) + 1
        print(f"[rank {rank}] resuming from the checkpoint of epoch {start_epoch - 1}")

    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    def optimizer_step() -> None:
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    for epoch in range(start_epoch, t.epochs + 1):
        started = time.perf_counter()
        model.train()
        loss_sum, seen, micro = 0.0, 0, 0
        batches = train_shard.iter_torch_batches(
            batch_size=t.batch_size,
            device=device,
            local_shuffle_buffer_size=t.shuffle_buffer or None,
            local_shuffle_seed=(cfg.seed * 100_003 + epoch * 1_009 + rank) if t.shuffle_buffer else None,
        )
        for batch, last in _with_last(batches):
            y = batch.pop("y")
            micro += 1
            sync = micro % t.grad_accum_steps == 0 or last
            # Gradients are all-reduced only on the micro-step that ends an accumulation group.
            with model.no_sync() if (ddp and not sync) else contextlib.nullcontext():
                with autocast:
                    logits = model(**batch)
                loss = F.cross_entropy(logits.float(), y)
                (loss / t.grad_accum_steps).backward()
            if sync:
                optimizer_step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
        train_s = time.perf_counter() - started

        model.eval()
        counts = np.zeros((num_labels, num_labels), np.int64)
        val_loss_sum = 0.0
        with torch.inference_mode():
            for batch in val_shard.iter_torch_batches(batch_size=t.eval_batch_size, device=device):
                y = batch.pop("y")
                with autocast:
                    logits = model(**batch).float()
                val_loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
                counts += metrics.confusion(y.cpu().numpy(), logits.argmax(-1).cpu().numpy(), num_labels)
        # Global figures: sum counts over ranks before dividing.
        reduced = _all_reduce_sum(np.concatenate([counts.ravel(), [val_loss_sum, loss_sum, seen]]), device)
        counts = reduced[: num_labels * num_labels].reshape(num_labels, num_labels)
        val_loss_sum, loss_sum, seen = reduced[num_labels * num_labels :]
        summary = metrics.summarize(counts)
        report = {
            "epoch": epoch,
            "train_loss": float(loss_sum / max(seen, 1)),
            "val_loss": float(val_loss_sum / max(counts.sum(), 1)),
            "val_accuracy": summary["accuracy"],
            "val_macro_f1": summary["macro_f1"],
            "samples_per_s": float(seen / train_s),
            "epoch_s": time.perf_counter() - started,
        }
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                checkpoints.save_checkpoint(tmp, _unwrap(model).state_dict(), cfg, labels, report)
                checkpoints.save_train_state(tmp, optimizer, scheduler, epoch)
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(report, checkpoint=ckpt)


# --- on the driver -----------------------------------------------------------------------------


class MetricsLog(UserCallback):
    """Appends rank 0's metrics of every epoch to metrics.jsonl (runs on the Train controller,
    which Ray places on the driver's node)."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        line = {k: metrics[0][k] for k in METRIC_KEYS if k in metrics[0]}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def build_trainer(
    cfg: Config,
    datasets: dict[str, ray.data.Dataset],
    info: DataInfo,
    *,
    name: str = "train",
    storage_path: Optional[str] = None,
    callbacks: Iterable[UserCallback] = (),
    train_loop: Callable[[dict], None] = train_loop_per_worker,
) -> TorchTrainer:
    """The TorchTrainer for one training run of ``cfg``; the same for `train` and every Tune trial."""
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump_json(), "labels": info.labels, "num_train": info.num_examples["train"]},
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
    )


def check_resources(cfg: Config, strict: bool = True, log=print) -> None:
    """Refuse (or warn about, on clusters that may autoscale) a run the cluster cannot hold."""
    s = cfg.scaling
    total = ray.cluster_resources()
    need_cpu = s.num_workers * s.cpus_per_worker + s.data_cpus
    problems = []
    if need_cpu > total.get("CPU", 0) + 1e-9:
        problems.append(
            f"needs {need_cpu:g} CPUs ({s.num_workers} workers x {s.cpus_per_worker:g} + {s.data_cpus:g} for Ray Data) "
            f"but the cluster has {total.get('CPU', 0):g}; lower scaling.num_workers or scaling.cpus_per_worker"
        )
    if s.use_gpu and s.num_workers > total.get("GPU", 0):
        problems.append(f"needs {s.num_workers} GPUs but the cluster has {total.get('GPU', 0):g}; set scaling.use_gpu=false or fewer workers")
    if problems and strict:
        raise ConfigError(problems)
    for p in problems:
        log(f"[warning] {p} (waiting for the cluster to scale up)")


RESUMABLE_CHANGES = ("train.max_failures", "scaling.", "storage.")


def _check_continuation(run_dir: Path, cfg: Config) -> bool:
    """True when this run continues an earlier one; refuse if its config changed what it trains."""
    previous_path = run_dir / "config.yaml"
    if not previous_path.is_file():
        return False
    previous = yaml.safe_load(previous_path.read_text())
    changed = [k for k in _diff(previous, cfg.to_dict()) if not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        raise ConfigError(
            [f"{run_dir} holds a run of a different config (changed: {', '.join(changed)}); "
             "choose another `name` (or --set name=...) or remove that directory"]
        )
    return True


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _follow(path: Path, stop: threading.Event, on_line: Callable[[dict], None]) -> None:
    offset = path.stat().st_size if path.exists() else 0
    while True:
        done = stop.is_set()
        if path.exists():
            with path.open() as f:
                f.seek(offset)
                for line in f:
                    if line.endswith("\n"):
                        offset += len(line)
                        on_line(json.loads(line))
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
    ``name`` continues the run from its last checkpoint.
    """
    from rayfine.evaluate import evaluate_checkpoint

    run_dir, started = cfg.run_dir(), time.time()
    train_dir = run_dir / "train"
    continuing = _check_continuation(run_dir, cfg)
    train_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    metrics_path = train_dir / "metrics.jsonl"
    if continuing and metrics_path.exists():
        done = len(metrics_path.read_text().splitlines())
        log(f"[train] continuing {run_dir} after {done} finished epoch(s)")
    if datasets is None or info is None:
        datasets, info = build_datasets(cfg, log=log)
    check_resources(cfg, strict=strict_resources, log=log)

    trainer = build_trainer(cfg, datasets, info, callbacks=[MetricsLog(str(metrics_path))], train_loop=train_loop)
    log(f"[train] {cfg.model.name} on {cfg.scaling.num_workers} DDP worker(s), {cfg.train.epochs} epochs -> {run_dir}")
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(metrics_path, stop, lambda m: log(format_epoch(m, cfg.train.epochs))), daemon=True)
    follower.start()
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; keep the first line readable
        raise TrainingError(f"training failed: {_first_line(e)}") from e
    finally:
        stop.set()
        follower.join()
    if result.error:
        raise TrainingError(f"training failed: {_first_line(result.error)}")

    best_ckpt, best_metrics = _best(result, cfg)
    exported = checkpoints.export_checkpoint(best_ckpt.path, train_dir / "checkpoint")
    log(f"[train] best epoch {best_metrics['epoch']} ({cfg.train.metric} {best_metrics[cfg.train.metric]:.4f}) -> {exported}")
    evaluation = evaluate_checkpoint(exported, datasets["test"], train_dir, log=log)
    return {
        "run_dir": str(run_dir),
        "checkpoint": str(exported),
        "best": best_metrics,
        "eval": evaluation,
        "data": info.to_dict(),
        "wall_s": time.time() - started,
    }


def _best(result, cfg: Config) -> tuple[Checkpoint, dict]:
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if c is not None]
    if not candidates:
        raise TrainingError("training finished without a checkpoint")
    sign = 1 if cfg.train.metric_mode == "max" else -1
    return max(candidates, key=lambda cm: (sign * cm[1][cfg.train.metric], cm[1]["epoch"]))


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    # Ray's wrapped errors end with the worker's exception; that is the useful line.
    return lines[-1] if lines else type(error).__name__
