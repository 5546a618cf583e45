"""The served model inside a replica: a checkpoint, its preprocessing and batched inference.

Runs in a Ray Serve replica (and in tests, in-process):

    served = load_served("runs/digits/train/checkpoint", ServeConfig())
    results = run_batch(served, [[png_bytes], [pixels_a, pixels_b]])   # one forward pass

Preprocessing is ``rayfine.data.Preprocessor``, built from the checkpoint alone, exactly as
training prepared its validation data; the serving limits only tighten it (pixels, text length).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from rayfine.config import Config, ServeConfig
from rayfine.errors import InputError, RayfineError

MODEL_FILE = "model.safetensors"  # rayfine.checkpoints.MODEL_FILE, named here too: this module imports without torch


def weights_version(checkpoint_dir: Union[str, Path]) -> str:
    """The model version a response names: the first 12 hex digits of the weights' SHA-256, so the
    same weights always have the same version, wherever they were copied."""
    digest = hashlib.sha256()
    with open(Path(checkpoint_dir) / MODEL_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def serving_config(cfg: Config, limits: ServeConfig) -> Config:
    """The checkpoint's config with the serving pixel limit applied (the stricter one wins)."""
    pixels = min(cfg.data.max_image_pixels, limits.max_image_pixels)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_image_pixels": pixels})})


COMPUTE_PHASES = ("compute_input", "compute_infer", "compute_output")


def _duration(count: int = 0, ns: int = 0) -> dict[str, int]:
    return {"count": count, "ns": ns}


@dataclass
class BatchStats:
    """Per model version, since it was loaded in this replica: Triton's statistics extension.

    Per request: success and fail (count and time from arrival at the replica's batcher to the
    answer), queue (waiting for a forward pass), and the compute phases of the pass that answered
    it. Per batch size: how many forward passes held that many items and their compute phases:
    compute_input (preprocessing, to the device), compute_infer (the forward pass),
    compute_output (back to host memory, split per request)."""

    started: float = field(default_factory=time.time)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    requests: dict[str, dict[str, int]] = field(
        default_factory=lambda: {k: _duration() for k in ("success", "fail", "queue", *COMPUTE_PHASES)})
    by_size: Counter = field(default_factory=Counter)
    ns_by_size: dict[int, dict[str, int]] = field(default_factory=dict)

    def record(self, size: int, phases_ns: tuple[int, int, int]) -> None:
        """One forward pass of ``size`` items; ``phases_ns``: compute input, infer and output."""
        self.inference_count += size
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)
        # Runs in the forward pass's thread while the stats routes read on the event loop: a size is
        # counted only once its times exist (batch_stats reads ns_by_size for every counted size).
        totals = self.ns_by_size.setdefault(size, dict.fromkeys(COMPUTE_PHASES, 0))
        for phase, ns in zip(COMPUTE_PHASES, phases_ns):
            totals[phase] += ns
        self.by_size[size] += 1

    def record_request(self, ok: bool, total_ns: int, queue_ns: Optional[int],
                       phases_ns: Optional[tuple[int, int, int]]) -> None:
        """One request's answer: its outcome and time, its wait and (when it ran) its pass's phases."""
        for key, ns in [("success" if ok else "fail", total_ns), ("queue", queue_ns),
                        *zip(COMPUTE_PHASES, phases_ns or (None,) * 3)]:
            if ns is not None:
                self.requests[key]["count"] += 1
                self.requests[key]["ns"] += ns

    def inference_stats(self) -> dict[str, dict[str, int]]:
        return {**{k: dict(v) for k, v in self.requests.items()}, "cache_hit": _duration()}  # no response cache

    def batch_stats(self) -> list[dict[str, Any]]:
        return [{"batch_size": size, **{phase: _duration(self.by_size[size], self.ns_by_size[size][phase])
                                        for phase in COMPUTE_PHASES}}
                for size in sorted(self.by_size)]


@dataclass
class ServedModel:
    path: str
    version: str
    cfg: Config
    labels: list[str]
    metrics: dict[str, Any]
    checkpoint: Any  # rayfine.checkpoints.LoadedCheckpoint
    preprocess: Any  # rayfine.data.Preprocessor
    device: str
    stats: BatchStats = field(default_factory=BatchStats)

    @property
    def kind(self) -> str:
        return self.cfg.data.kind

    @property
    def pairs(self) -> bool:
        """Whether it takes [text, pair] inputs: a text model trained with data.text_pair_column."""
        return model_api(self.cfg)["pairs"]

    def describe(self) -> dict[str, Any]:
        """What `rayfine serve --if-better` compares, and what a handle's ``info`` returns."""
        return {"checkpoint": self.path, "version": self.version, **model_api(self.cfg, self.labels),
                "metric": self.cfg.train.metric, "metric_mode": self.cfg.train.metric_mode, "metrics": self.metrics,
                "experiment": self.cfg.name}


def model_api(cfg: Config, labels: list[str] | None = None) -> dict[str, Any]:
    """What the clients of a model served from ``cfg`` depend on: the inputs it takes (``kind``,
    and ``pairs``: a text model trained with data.text_pair_column takes [text, pair] rows) and,
    when known, its ``labels`` in id order (the columns of 'probabilities')."""
    kind = cfg.data.kind
    return {"kind": kind, "pairs": kind == "text" and bool(cfg.data.text_pair_column), "labels": labels}


def load_served(path: Union[str, Path], limits: ServeConfig, device: Optional[str] = None) -> ServedModel:
    """Load a checkpoint for serving (safetensors only) with the preprocessing it was trained with."""
    from rayfine.checkpoints import load_checkpoint
    from rayfine.data import Preprocessor

    if device is None:
        import torch

        if limits.gpus_per_replica > 0 and not torch.cuda.is_available():
            # A replica that reserved a GPU serving on the CPU would be silently many times slower.
            raise RayfineError(f"serve.gpus_per_replica is {limits.gpus_per_replica}, but this replica's torch "
                               f"{torch.__version__} sees no CUDA device; set serve.gpus_per_replica=0 to serve on the CPU")
        device = "cuda" if limits.gpus_per_replica > 0 else "cpu"
    ckpt = load_checkpoint(path, device=device)
    cfg = serving_config(ckpt.cfg, limits)
    pre = Preprocessor(cfg, str(ckpt.path), max_text_chars=limits.max_text_chars)
    return ServedModel(str(Path(path).resolve()), weights_version(path), ckpt.cfg, list(ckpt.labels),
                       dict(ckpt.metrics), ckpt, pre, device)


@dataclass
class Answer:
    """One request's share of a batch: probabilities (N x labels) or the reason its input is bad."""

    version: str
    labels: list[str]
    probs: Optional[np.ndarray] = None
    error: Optional[str] = None
    started_ns: Optional[int] = None  # time.perf_counter_ns() when its batch started
    phases_ns: Optional[tuple[int, int, int]] = None  # its forward pass's compute input, infer, output


def _preprocess(served: ServedModel, items: list) -> dict:
    return served.preprocess(items)


def _preprocessing_error(served: ServedModel, items: list) -> str | None:
    """Why one request's items cannot be preprocessed, naming the first bad one by its place in the
    request ("input 3: not a readable image ..."), as the protocol's own checks name it; else None."""
    try:
        _preprocess(served, items)
        return None
    except InputError as e:
        if str(e).startswith("input "):  # named already (rayfine.data.text.check_texts)
            return str(e)
    except Exception:  # noqa: BLE001, S110 - which item, and why, is found below
        pass
    for j, item in enumerate(items):
        try:
            _preprocess(served, [item])
        except InputError as e:
            return f"input {j}: {e}"
        except Exception as e:  # an input the decoders choke on is still the input's fault
            return f"input {j} could not be preprocessed: {type(e).__name__}: {e}"
    return "the inputs could not be preprocessed together"


def run_batch(served: ServedModel, requests: list[list]) -> list[Answer]:
    """Preprocess every request's items and run one forward pass for all of them.

    A request whose input cannot be preprocessed gets its own error and the others still get
    their answers: the batch is preprocessed whole, and only when that fails, request by request."""
    import torch

    started = time.perf_counter_ns()
    errors: dict[int, str] = {}
    good = list(range(len(requests)))
    try:
        inputs = _preprocess(served, [item for r in requests for item in r])
    except Exception:
        good = []
        for i, items in enumerate(requests):
            problem = _preprocessing_error(served, items)
            if problem:
                errors[i] = problem
            else:
                good.append(i)
        inputs = _preprocess(served, [item for i in good for item in requests[i]]) if good else None
    answers = [Answer(served.version, served.labels, error=errors.get(i), started_ns=started) for i in range(len(requests))]
    if inputs is None:
        return answers
    tensors = {k: v.to(served.device) for k, v in inputs.items()}
    inferring = time.perf_counter_ns()
    with torch.inference_mode():
        out = served.checkpoint.predict_proba(tensors)
    if out.is_cuda:  # CUDA kernels run asynchronously: the forward pass ends here, not at .cpu()
        torch.cuda.synchronize(out.device)
    outputting = time.perf_counter_ns()
    probs = out.cpu().numpy()
    offset = 0
    for i in good:
        n = len(requests[i])
        answers[i].probs = probs[offset:offset + n]
        offset += n
    phases = (inferring - started, outputting - inferring, time.perf_counter_ns() - outputting)
    served.stats.record(len(probs), phases)
    for i in good:
        answers[i].phases_ns = phases
    return answers
