"""What runs in every DDP worker: ``train_loop_per_worker`` and its optimizer and schedule.

Each worker takes its shard of the data with ``ray.train.get_dataset_shard``, wraps the model with
``ray.train.torch.prepare_model`` (DDP: gloo on CPU, NCCL on GPU), validates every epoch with
confusion matrices summed over all ranks, and has rank 0 save a checkpoint every epoch. After a
failure it resumes from ``ray.train.get_checkpoint()`` at the next epoch.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.train import Checkpoint

from rayfine import checkpoints, metrics
from rayfine.config import Config
from rayfine.data import batch_collate, label_text, model_batch, tokenizer_source
from rayfine.data.images import augment_batch
from rayfine.data.text import load_tokenizer
from rayfine.errors import TrainingError
from rayfine.metrics import METRIC_KEYS
from rayfine.models import NEW_PARAMS_ATTR, build_model, logits_of, with_pretrained_normalization

if TYPE_CHECKING:
    from typing import Self  # Python 3.11; annotations are not evaluated at run time here

# Marks a report that repeats the epoch of the checkpoint a run resumed from; its value is that
# checkpoint's path. Ray Train registers an epoch's checkpoint before the report callbacks log the
# epoch, so a run that died between the two resumes after an epoch its logs never saw. The logs
# (``MetricsLog``, the trials' ``EpochLog``) add a replayed epoch only when they lack it.
REPLAYED_FROM = "replayed_from_checkpoint"


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW or SGD over every parameter, in groups: the new head may have its own learning rate
    (train.head_lr), and biases and norm weights get no weight decay (usual fine-tuning practice)."""
    t = cfg.train
    new = getattr(model, NEW_PARAMS_ATTR, frozenset())
    groups = []
    for is_head in (False, True):
        for decay in (True, False):
            params = [p for n, p in model.named_parameters() if (n in new) == is_head and (p.ndim > 1) == decay]
            if params:
                lr = t.head_lr if (is_head and t.head_lr) else t.lr
                groups.append({"params": params, "lr": lr, "weight_decay": t.weight_decay if decay else 0.0})
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


def position_schedule(scheduler, step: int) -> None:
    """Put ``make_scheduler``'s schedule where it is after ``step`` optimizer steps: its step counter
    and its groups' learning rates, as its own ``step()`` would have left them."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)  # what get_last_lr() answers


def accumulation_group_size(micro: int, batches_per_epoch: int, grad_accum_steps: int) -> int:
    """How many micro-batches the gradient-accumulation group of micro-batch ``micro`` (counted from
    1 in its epoch) holds: ``grad_accum_steps``, but the epoch's last group holds what is left. Each
    micro-batch's loss is divided by it, so an optimizer step follows the mean over its group."""
    start = (micro - 1) // grad_accum_steps * grad_accum_steps
    return max(1, min(grad_accum_steps, batches_per_epoch - start))


def train_batches(rows: int, batch_size: int) -> int:
    """Training steps per epoch of a worker's ``rows``: every batch, but a last batch of a single
    example when there are others. BatchNorm cannot train on one example ("Expected more than 1
    value per channel when training" when the feature map is 1x1, as at the end of a ResNet on
    small images), so such a batch is left out: one example of the epoch, drawn afresh by each
    epoch's shuffle."""
    full, rest = divmod(rows, batch_size)
    return max(1, full + (rest > 1))


def seed_epoch(seed: int, epoch: int, rank: int) -> int:
    """Seed torch's generators (CPU and every GPU: dropout masks) for one epoch of one rank, and
    return that seed, so that what an epoch draws depends on (seed, epoch, rank) alone, not on what
    the process drew before it (the epochs before a restart, a pretrained model's loading)."""
    epoch_seed = seed * 100_003 + epoch * 1_009 + rank
    torch.manual_seed(epoch_seed)
    return epoch_seed


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


def _broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank, as DDP's forward broadcasts
    them before each training step (``broadcast_buffers``). A buffer that is not contiguous (a view
    expanded along a dimension) cannot be broadcast in place; such views are constants that no
    forward pass changes, the same on every rank, and are left as they are."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            if buffer.is_contiguous():
                dist.broadcast(buffer, src=0)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def keep_frozen_norm_statistics(model: torch.nn.Module) -> None:
    """While the body is frozen (train.freeze_epochs), its BatchNorm layers, whose parameters take no
    gradient, run in eval mode: they normalize with their pretrained running statistics and keep
    them, as a linear probe's frozen backbone does (Keras' frozen BatchNorm, timm's
    freeze_batch_norm_2d). In train mode they would normalize each batch by its own statistics,
    which validation and serving never use, and overwrite the pretrained ones with no gradient at all."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters(recurse=False)):
            module.eval()


def ddp_options(model: torch.nn.Module, example: dict[str, torch.Tensor]) -> dict[str, Any]:
    """DistributedDataParallel's options for ``model``: find_unused_parameters when a forward and
    backward pass on ``example`` (``model_example``) leaves a trainable parameter without a gradient.
    Some Hugging Face classifiers hold parameters that classification never uses (DINOv2's
    mask_token, XLNet's mask_emb: read only with masked inputs), and DDP without the option fails
    at the second step ("Expected to have finished reduction in the prior iteration"); with it,
    DDP searches the autograd graph at every step (and torch warns when it finds nothing unused).
    The pass runs in eval mode (no dropout draw, no BatchNorm update) and leaves no gradient."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        logits_of(model(**example)).float().sum().backward()
        unused = any(p.requires_grad and p.grad is None for p in model.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {"find_unused_parameters": True} if unused else {}


def model_example(cfg: Config, device: torch.device) -> dict[str, torch.Tensor]:
    """One input as the model takes it, prepared as serving prepares one: a blank image, or "a"."""
    from rayfine.data import Preprocessor

    d = cfg.data
    if d.kind == "text":
        item: Any = ["a", "a"] if d.text_pair_column else "a"
    else:
        item = np.zeros((d.image_size, d.image_size, d.channels), dtype=np.uint8)
    return {k: v.to(device) for k, v in Preprocessor(cfg)([item]).items()}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively: on x86, AVX512-BF16 or AMX, as torch reads the
    CPU's flags (oneDNN's own check, ``_is_mkldnn_bf16_supported``, says yes for any AVX-512 CPU:
    Skylake-SP to Ice Lake-SP emulate bfloat16, ~1.5x slower than fp32); elsewhere (Arm) as oneDNN
    reports it. True when torch cannot say."""
    import platform

    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def precision_warning(precision: str, device: torch.device) -> str | None:
    """What to tell the user before training in ``precision`` on ``device``; None when all is well.

    bf16 on a CPU without native bfloat16 runs, but autocast emulates it: on an AVX2-only AMD EPYC a
    ResNet-18 training step took ~40x as long as in fp32."""
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        return ("warning: train.precision=bf16 on a CPU without native bfloat16 (AVX512-BF16 or AMX): "
                "autocast emulates it, many times slower than fp32; set train.precision=fp32")
    # is_bf16_supported() alone says True on GPUs before Ampere (T4, V100), which emulate bfloat16.
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return ("warning: train.precision=bf16 on a GPU without native bfloat16 (before compute capability 8.0): "
                "it is emulated, slower than fp32; set train.precision=fp32")
    return None


class ProcessExiting(RuntimeError):
    """Raised in the training thread when its process has begun to exit (``ExitGuard``)."""


class ExitGuard:
    """Stops the training loop at its next batch once the worker's process begins to exit, before
    the interpreter shuts down under it.

    Ray Train runs ``train_loop_per_worker`` in a daemon thread of the worker process. When the
    process is ended gracefully (SIGTERM: Ray's handler raises SystemExit in the main thread; a
    worker of a trial that ASHA stopped was seen to exit this way), CPython finalizes while that
    thread is inside torch's C++ code (backward, the optimizer step) without the GIL. When the
    thread takes the GIL back, CPython 3.11 ends it with ``pthread_exit``, whose unwinding through
    torch's C++ frames calls std::terminate: "Fatal Python error: Aborted" and a C++ stack in the
    worker's log, on the console. atexit handlers run before finalization: this one asks the loop
    to stop (``check`` raises ``ProcessExiting`` at the next batch) and waits up to ``timeout_s``
    for the thread to end, less than the 5 s after which the raylet follows its SIGTERM with
    SIGKILL (``kill_worker_timeout_milliseconds``)."""

    def __init__(self, timeout_s: float = 4.0):
        self.timeout_s = timeout_s
        self.exiting = threading.Event()
        self.thread = threading.current_thread()

    def __enter__(self) -> Self:
        atexit.register(self._on_exit)
        return self

    def __exit__(self, *exc) -> None:
        atexit.unregister(self._on_exit)

    def _on_exit(self) -> None:
        self.exiting.set()
        if self.thread is not threading.current_thread():
            self.thread.join(self.timeout_s)

    def check(self) -> None:
        if self.exiting.is_set():
            raise ProcessExiting("this worker's process is exiting; training stopped at a batch boundary")


def model_and_optimizer(cfg: Config, labels: list[str], device: torch.device, total_steps: int,
                        checkpoint_dir: str | None = None, steps_per_epoch: int | None = None,
                        log=None) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, int]:
    """The model on ``device``, its optimizer and LR scheduler, restored from ``checkpoint_dir``
    when given; and the epoch that checkpoint finished (0 without one).

    With ``steps_per_epoch`` (this run's optimizer steps per epoch), a restored schedule continues
    from the epoch the checkpoint finished, not from its step count: a run continued with another
    ``scaling.num_workers`` takes another number of steps per epoch (each worker's shard is
    ``num_train // num_workers`` rows), and its ``total_steps`` are counted in the new steps, so the
    old count would put the schedule elsewhere (past its end with more workers: a learning rate of
    0 for the epochs left).

    The model moves to its device before its optimizer exists: ``Optimizer.load_state_dict`` puts
    each state tensor (AdamW's moments, SGD's momentum) on its parameter's device at that moment,
    and a later ``Module.to`` moves the parameters but not the state, so a run resumed on a GPU
    would step with CPU moments for CUDA parameters (PyTorch: move a model before constructing
    its optimizer)."""
    if checkpoint_dir is not None:
        check_same_labels(Path(checkpoint_dir), labels)
    model = build_model(cfg, labels)
    if checkpoint_dir is not None:
        model.load_state_dict(checkpoints.load_tensors(Path(checkpoint_dir) / checkpoints.MODEL_FILE))
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    done = checkpoints.load_train_state(checkpoint_dir, optimizer, scheduler) if checkpoint_dir is not None else 0
    if done and steps_per_epoch and scheduler.last_epoch != done * steps_per_epoch:
        if log is not None:
            log(f"optimizer steps per epoch changed from {scheduler.last_epoch / done:g} to {steps_per_epoch} "
                f"(another scaling.num_workers or data size); the learning-rate schedule continues after epoch {done}")
        position_schedule(scheduler, done * steps_per_epoch)
    return model, optimizer, scheduler, done


def check_same_labels(directory: Path, labels: list[str]) -> None:
    """A run continues from its checkpoint only with the labels it was trained on, in their order
    (the head's rows): data whose classes changed since, or labels read in another Unicode form
    that sorts otherwise, would train every class under another's row."""
    saved = checkpoints.read_json(directory / checkpoints.LABELS_FILE, "labels")
    if [label_text(label) for label in saved] != list(labels):  # as the data's labels are read (NFC)
        raise TrainingError(f"the checkpoint this run continues from ({directory}) was trained on the labels {saved}, "
                            f"the data now gives {labels}: a continued run keeps its classes; give the run another "
                            "`name` to train on these")


def checkpoint_metrics(directory: Path) -> dict[str, Any]:
    """A checkpoint's metrics.json as its epoch reported them: the file writes a non-finite value
    (a diverged loss) as null, and Ray Train needs a number to score the report again."""
    saved = checkpoints.read_json(directory / checkpoints.METRICS_FILE, "checkpoint metrics")
    return metrics.nan_for_null(saved, METRIC_KEYS)


def train_loop_per_worker(config: dict) -> None:
    """One DDP worker: config = {"cfg": <Config JSON>, "labels": [...], "num_train": int,
    "class_weights": [...] or None}."""
    with ExitGuard() as guard:
        _train(config, guard)


def _train(config: dict, guard: ExitGuard) -> None:
    cfg = Config.model_validate_json(config["cfg"])
    # Ray sets the worker's root logger to INFO; its per-report lines would drown our epoch lines.
    logging.getLogger().setLevel(logging.WARNING)
    labels: list[str] = config["labels"]
    num_labels = len(labels)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    np.random.seed((cfg.seed + rank) % 2**32)  # numpy takes seeds below 2**32; cfg.seed may be 2**32 - 1
    # Normalize as the pretrained model learnt; the checkpoint's config carries the values on.
    cfg = with_pretrained_normalization(cfg, log=print if rank == 0 else None)

    t = cfg.train
    rows_per_worker = config["num_train"] // world  # equal shards (train.driver.ShardedIngest)
    batches_per_epoch = train_batches(rows_per_worker, t.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum_steps)
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as d:
        model, optimizer, scheduler, done = model_and_optimizer(
            cfg, labels, device, steps_per_epoch * t.epochs, d, steps_per_epoch=steps_per_epoch,
            log=(lambda m: print(f"[rank 0] {m}")) if rank == 0 else None)
        if checkpoint:
            resumed_report = checkpoint_metrics(Path(d))
    start_epoch = done + 1
    if checkpoint:
        print(f"[rank {rank}] resuming from the checkpoint of epoch {done}")
        ray.train.report({**resumed_report, REPLAYED_FROM: checkpoint.path})  # every rank reports

    # Frozen parameters must be frozen before DDP wraps the model (DDP syncs exactly the
    # parameters that require grad at wrap time), so unfreezing re-wraps it.
    new_params = getattr(model, NEW_PARAMS_ATTR, frozenset())
    body = [p for n, p in model.named_parameters() if n not in new_params]
    frozen = t.freeze_epochs == -1 or start_epoch <= t.freeze_epochs
    for p in body:
        p.requires_grad_(not frozen)
    example = model_example(cfg, device) if world > 1 else None  # one worker: no DDP

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs=ddp_options(module, example)
                                             if example is not None else None)

    model = wrap(model)

    weights = config.get("class_weights")
    class_weights = torch.tensor(weights, dtype=torch.float32, device=device) if weights else None
    collate = batch_collate(cfg)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
    if rank == 0 and (warning := precision_warning(t.precision, device)):
        print(f"[rank 0] {warning}")
    augment_images = cfg.data.kind == "image" and cfg.data.augment
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    def optimizer_step() -> None:
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def to_device(batch: dict) -> dict:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    for epoch in range(start_epoch, t.epochs + 1):
        if frozen and t.freeze_epochs != -1 and epoch > t.freeze_epochs:
            for p in body:
                p.requires_grad_(True)
            model = wrap(_unwrap(model))
            frozen = False
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        started = time.perf_counter()
        model.train()
        if frozen:
            keep_frozen_norm_statistics(model)
        # The loss is summed on the device and read once an epoch: a .item() per step would make the
        # host wait for each CUDA step before queueing the next.
        loss_sum, seen, micro = torch.zeros((), dtype=torch.float64, device=device), 0, 0
        # One seed per (run seed, epoch, rank) for the shuffle buffer, the augmentation and torch's
        # own generators (dropout): a resumed epoch draws exactly what it drew before the failure.
        epoch_seed = seed_epoch(cfg.seed, epoch, rank)
        augment = torch.Generator().manual_seed(epoch_seed) if augment_images else None
        batches = train_shard.iter_torch_batches(
            batch_size=t.batch_size,
            collate_fn=collate,
            local_shuffle_buffer_size=max(t.shuffle_buffer, t.batch_size) if t.shuffle_buffer else None,
            local_shuffle_seed=epoch_seed if t.shuffle_buffer else None,
        )
        for batch, last in _with_last(batches):
            guard.check()
            if last and micro == batches_per_epoch and len(batch["y"]) == 1:
                continue  # the lone last example (train_batches); the batch before it was the last step
            batch = model_batch(to_device(batch), cfg.data)
            if augment is not None:
                batch["pixel_values"] = augment_batch(batch["pixel_values"], cfg.data, augment)
            y = batch.pop("y")
            micro += 1
            sync = micro % t.grad_accum_steps == 0 or last or micro == batches_per_epoch
            # Gradients are all-reduced only on the micro-step that ends an accumulation group.
            with model.no_sync() if (ddp and not sync) else contextlib.nullcontext():
                with autocast:
                    logits = logits_of(model(**batch))
                loss = F.cross_entropy(logits.float(), y, weight=class_weights, label_smoothing=t.label_smoothing)
                (loss / accumulation_group_size(micro, batches_per_epoch, t.grad_accum_steps)).backward()
            if sync:
                optimizer_step()
            loss_sum += loss.detach() * len(y)
            seen += len(y)
        loss_sum = loss_sum.item()  # waits for the epoch's last step, so train_s times the work itself
        train_s = time.perf_counter() - started

        counts, val_loss_sum = _validate(_unwrap(model), val_shard, cfg, num_labels, collate, to_device, autocast,
                                         guard)
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
        _report_epoch(report, rank, _unwrap(model), optimizer, scheduler, cfg, labels)


def _validate(net: torch.nn.Module, shard, cfg: Config, num_labels: int, collate, to_device, autocast,
              guard: ExitGuard) -> tuple[np.ndarray, float]:
    """This rank's confusion counts and summed loss over its validation shard.

    Each rank validates its own val shard, and the shards differ in size by up to one row, so no
    collective may run per batch: ``net`` is the module itself, not DDP's forward (which broadcasts
    buffers on its first call). It scores with rank 0's buffers, the model rank 0 saves."""
    _broadcast_buffers(net)
    net.eval()
    counts = np.zeros((num_labels, num_labels), np.int64)
    # Labels, predictions and losses stay on the device until the shard ends (one copy to the host, not
    # one wait per batch); the confusion counts are added on the host, whatever the label count.
    truths, predictions, losses = [], [], []
    with torch.inference_mode():
        for batch in shard.iter_torch_batches(batch_size=cfg.train.eval_batch_size, collate_fn=collate):
            guard.check()
            batch = model_batch(to_device(batch), cfg.data)
            y = batch.pop("y")
            with autocast:
                logits = logits_of(net(**batch)).float()
            losses.append(F.cross_entropy(logits, y, reduction="sum"))
            truths.append(y)
            predictions.append(logits.argmax(-1))
        if not truths:
            return counts, 0.0
        metrics.add_confusion(counts, torch.cat(truths).cpu().numpy(), torch.cat(predictions).cpu().numpy())
        return counts, torch.stack(losses).double().sum().item()


def _report_epoch(report: dict, rank: int, net: torch.nn.Module, optimizer, scheduler, cfg: Config,
                  labels: list[str]) -> None:
    """Every rank reports the epoch's metrics; rank 0 attaches the checkpoint (weights, config,
    labels, metrics, and the optimizer and scheduler state a resumed run starts from)."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            tokenizer = load_tokenizer(tokenizer_source(cfg)) if cfg.data.kind == "text" else None
            checkpoints.save_checkpoint(tmp, net, cfg, labels, report, tokenizer=tokenizer)
            checkpoints.save_train_state(tmp, optimizer, scheduler, report["epoch"])
            ckpt = Checkpoint.from_directory(tmp)
        ray.train.report(report, checkpoint=ckpt)
