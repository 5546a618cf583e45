"""The one artifact format. A checkpoint is a directory:

    model.safetensors     the weights (never a pickle)
    config.yaml           the resolved experiment config (a password in a URL in it masked: ***)
    labels.json           label names in id order
    metrics.json          the epoch's metrics
  Hugging Face models add their config.json and, for texts, the tokenizer files (for RGB images,
  preprocessor_config.json): the directory is then also a standard Hugging Face model directory
  (``from_pretrained`` and ``pipeline`` load it), and a checkpoint alone serves with no network.
  And, in the per-epoch checkpoints Ray Train keeps for resuming:
    optimizer.safetensors optimizer tensors, flattened
    train_state.json      epoch, optimizer param groups, scheduler state

    ckpt = load_checkpoint("runs/digits/train/checkpoint")
    probs = ckpt.predict_proba(batch_inputs)

Loading reads only safetensors and JSON/YAML, so a checkpoint from an untrusted place cannot run
code; a truncated or foreign file is refused with ``CheckpointError``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rayfine.config import Config, ConfigError, validate
from rayfine.config.sections import ServeConfig, redact_url_passwords
from rayfine.errors import CheckpointError
from rayfine.metrics import json_text

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.json"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAIN_STATE_FILE = "train_state.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
INFERENCE_FILES = (MODEL_FILE, CONFIG_FILE, LABELS_FILE, METRICS_FILE)


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous views; give it plain CPU copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    cfg: Config,
    labels: list[str],
    metrics: dict[str, Any],
    tokenizer=None,
) -> Path:
    """Write the checkpoint files; a Hugging Face model adds its config.json (and the tokenizer
    files, or an RGB image model's preprocessor_config.json), which makes the directory loadable
    by ``AutoModelFor*.from_pretrained`` and ``pipeline`` as well."""
    from rayfine.data.images import hf_image_processor_config
    from rayfine.models import is_hugging_face

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(model.state_dict()), str(directory / MODEL_FILE), metadata={"format": "pt"})
    if is_hugging_face(model):
        # As model.save_pretrained writes it: `architectures` names the classifier class, which
        # tools that read config.json (sentence-transformers' CrossEncoder, the Hub) go by.
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(str(directory))
        processor = hf_image_processor_config(cfg.data)
        if processor is not None:
            (directory / PREPROCESSOR_FILE).write_text(json.dumps(processor, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    # Masked: a checkpoint travels (MLflow's artifact store, an export served elsewhere), and a
    # database tracking_uri carries its password; nothing reads tracking from a checkpoint.
    (directory / CONFIG_FILE).write_text(redact_url_passwords(cfg.to_yaml()))
    (directory / LABELS_FILE).write_text(json.dumps(labels, indent=1))
    (directory / METRICS_FILE).write_text(json_text(metrics, indent=1))
    return directory


def save_train_state(directory: str | Path, optimizer: torch.optim.Optimizer, scheduler, epoch: int) -> None:
    """Optimizer tensors as safetensors, everything else as JSON: resumable without pickle."""
    directory = Path(directory)
    opt_state = optimizer.state_dict()
    tensors = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in opt_state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    save_file(_tensors(tensors), str(directory / OPTIMIZER_FILE))
    state = {
        "epoch": epoch,
        "param_groups": opt_state["param_groups"],
        "scalars": scalars,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
    }
    (directory / TRAIN_STATE_FILE).write_text(json.dumps(state))


def load_train_state(directory: str | Path, optimizer: torch.optim.Optimizer, scheduler) -> int:
    """Restore optimizer and scheduler; returns the epoch the checkpoint finished."""
    directory = Path(directory)
    state = read_json(directory / TRAIN_STATE_FILE, "training state")
    tensors = load_tensors(directory / OPTIMIZER_FILE)
    opt_state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        opt_state.setdefault(int(param_id), {})[key] = value
    for param_id, values in state["scalars"].items():
        opt_state.setdefault(int(param_id), {}).update(values)
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    scheduler_state = scheduler.state_dict()
    scheduler_state.update(state["scheduler"])
    scheduler.load_state_dict(scheduler_state)
    return int(state["epoch"])


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing or broken file is a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or not safetensors): {e}") from None


def read_config(directory: str | Path) -> Config:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a rayfine checkpoint: {CONFIG_FILE} is missing")
    try:
        return validate(yaml.safe_load(path.read_text()))
    except (ConfigError, yaml.YAMLError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {what}: {e}") from None


@dataclass
class LoadedCheckpoint:
    path: Path
    cfg: Config
    labels: list[str]
    metrics: dict[str, Any]
    model: torch.nn.Module

    def _logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's float logits for ``inputs``, moved to the model's device (a ``Preprocessor``
        gives CPU tensors; ``load_checkpoint(..., device="cuda")`` put the model on a GPU)."""
        from rayfine.models import logits_of

        device = next(self.model.parameters()).device
        return logits_of(self.model(**{k: v.to(device) for k, v in inputs.items()})).float()

    @torch.inference_mode()
    def predict_proba(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.softmax(self._logits(inputs), dim=-1)

    @torch.inference_mode()
    def predict_log_proba(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """log of ``predict_proba``, exact where the probability underflows (a confident mistake)."""
        return torch.log_softmax(self._logits(inputs), dim=-1)


def load_checkpoint(directory: str | Path, device: Optional[str] = None) -> LoadedCheckpoint:
    """Rebuild the model from the checkpoint alone and load its safetensors weights."""
    from rayfine.models import model_from_checkpoint

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    cfg = read_config(directory)
    labels = read_json(directory / LABELS_FILE, "labels")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
        raise CheckpointError(f"{directory / LABELS_FILE}: expected a list of distinct label names")
    metrics = read_json(directory / METRICS_FILE, "metrics") if (directory / METRICS_FILE).is_file() else {}
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{directory / METRICS_FILE}: expected a JSON object of metrics")
    state = load_tensors(directory / MODEL_FILE)
    model = model_from_checkpoint(directory, cfg, labels)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{directory / MODEL_FILE} does not fit {cfg.model.name}: {e}") from None
    config = getattr(model, "config", None)  # a Hugging Face model's config.json names its classes too
    if config is not None and [config.id2label.get(i) for i in range(config.num_labels)] != labels:
        raise CheckpointError(f"{directory}: config.json's id2label {config.id2label} is not {LABELS_FILE}'s "
                              f"{labels}; the two must name the same classes in the same order")
    model.eval().to(device or "cpu")
    return LoadedCheckpoint(directory, cfg, labels, metrics, model)


def export_checkpoint(source: str | Path, destination: str | Path, serve: ServeConfig | None = None) -> Path:
    """Copy the inference files of a checkpoint (not the optimizer state) to ``destination``; with
    ``serve``, its config's serve section is that one (the settings of the run that exports it,
    which a continued run may have changed since the epoch was trained)."""
    source, destination = Path(source), Path(destination)
    staging = destination.with_name(destination.name + ".tmp")
    previous = destination.with_name(destination.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    if previous.exists() and not destination.exists():
        previous.rename(destination)  # an export that stopped between its two renames below
    shutil.rmtree(previous, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in sorted(p.name for p in source.iterdir()):
        if name not in (OPTIMIZER_FILE, TRAIN_STATE_FILE):
            src = source / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, staging / name)
    if serve is not None:
        cfg = read_config(staging).model_copy(update={"serve": serve})
        (staging / CONFIG_FILE).write_text(redact_url_passwords(cfg.to_yaml()))
    # Swap in whole: a reader never sees a half-written checkpoint, and a crash leaves a whole one at
    # ``destination``, the old or the new; only between the two renames is the old one aside, as
    # <name>.old, where the next export puts it back from. The files reach the disk before the
    # renames, and the renames before the old one is removed: after a power loss too, the name holds
    # a whole checkpoint (a rename can reach the disk before the data of the files it names).
    _fsync_tree(staging)
    if destination.exists():
        destination.rename(previous)
    staging.rename(destination)
    _fsync(destination.parent)
    shutil.rmtree(previous, ignore_errors=True)
    return destination


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:
        if path.is_dir():  # Windows cannot open a directory to flush it
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))
