"""The experiment config: one typed, frozen tree validated once, everywhere.

    from rayfine.config import load_config
    cfg = load_config("resnet18_digits", ["train.lr=3e-4", "scaling.num_workers=1"])
    print(cfg.to_yaml())

A config comes from a YAML file or a shipped preset (``rayfine/configs/*.yaml``), plus dotted
overrides ``key.sub=value`` whose values are parsed as YAML scalars. Unknown keys are errors, and
every error names the dotted field, the bad value and what is allowed (``ConfigError``).
The resolved config is saved in every run directory and checkpoint, and travels to the Ray
workers as JSON, where it is validated again.
"""

from __future__ import annotations

import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rayfine.errors import RayfineError

TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50")


class ConfigError(RayfineError, ValueError):
    """A config that cannot be used; ``errors`` holds one readable line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid config:\n" + "\n".join(f"  - {e}" for e in errors))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class DataConfig(_Section):
    """Where the examples come from and how they become model inputs."""

    kind: Literal["image"] = Field("image", description="What the examples are.")
    source: str = Field(
        description="builtin:digits | builtin:mnist5k | a folder of class subfolders of images "
        "(local or s3://) | a parquet file or folder with an image-bytes column and a label column."
    )
    format: Literal["auto", "image_folder", "parquet"] = Field(
        "auto", description="How to read a non-builtin source; auto: by file extension."
    )
    image_column: str = Field(
        "image", description="Parquet: column of encoded image bytes (or a {bytes, path} struct, "
        "as Hugging Face datasets write it)."
    )
    label_column: str = Field("label", description="Parquet: column holding the label.")
    labels: Optional[tuple[str, ...]] = Field(
        None,
        description="The label names in id order. Unset: every label found in the data, sorted "
        "(numerically when all are integers). Set: a row with any other label is a bad row.",
    )
    image_size: int = Field(32, ge=4, le=1024, description="Images are resized to this square size.")
    color_mode: Literal["L", "RGB"] = Field(
        "RGB", description="L (1 channel) or RGB (3). Transparent images are composited on black."
    )
    mean: Optional[tuple[float, ...]] = Field(
        None, description="Per-channel normalization mean; unset: ImageNet's (its average for L)."
    )
    std: Optional[tuple[float, ...]] = Field(None, description="Per-channel std; unset: ImageNet's.")
    augment: bool = Field(False, description="Train-time random shifts and brightness/contrast jitter.")
    hflip: bool = Field(False, description="With augment: random horizontal flips (not for digits).")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Share of examples in the val split.")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Share of examples in the test split.")
    split_seed: int = Field(
        0, description="Seed of the content hash that assigns each example to a split; kept apart "
        "from `seed` so that changing the training seed never changes the test set."
    )
    subsample: float = Field(
        1.0, gt=0, le=1, description="Keep this share of the examples (seeded, by content hash)."
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="Unreadable images or unknown labels: stop with a report (error) or "
        "leave them out and report their count and examples (skip)."
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Images with more pixels are bad rows (decompression bombs)."
    )

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be below 1, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )
        channels = 1 if self.color_mode == "L" else 3
        for field in ("mean", "std"):
            value = getattr(self, field)
            if value is not None and len(value) != channels:
                raise ValueError(
                    f"{field} needs {channels} value(s) for color_mode {self.color_mode}, got {list(value)}"
                )
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {list(self.labels)}")
        return self

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3


class ModelConfig(_Section):
    """Which network to fine-tune."""

    name: str = Field("resnet18", description="One of: " + ", ".join(TORCHVISION_MODELS) + ".")
    weights: Optional[str] = Field(
        None,
        description="Start from these weights: a torchvision weights name (e.g. IMAGENET1K_V1, "
        "from the local torch hub cache) or a path to a .safetensors file. Unset: random init.",
    )
    stem: Literal["auto", "imagenet", "small"] = Field(
        "auto",
        description="ResNet input stem. imagenet: 7x7 stride-2 conv + max-pool (for >= 64 px). "
        "small: 3x3 stride-1 conv, no pool, the CIFAR-style stem that keeps 8-32 px images from "
        "shrinking to nothing. auto: small below 64 px.",
    )

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in TORCHVISION_MODELS:
            raise ValueError(f"unknown model {name!r}; allowed: {', '.join(TORCHVISION_MODELS)}")
        return name


class TrainConfig(_Section):
    """The optimisation, per DDP worker."""

    epochs: int = Field(10, ge=1, description="Passes over the training split.")
    lr: float = Field(1e-3, gt=0, le=10, description="Peak learning rate (after warmup).")
    batch_size: int = Field(64, ge=1, description="Examples per step on each worker.")
    eval_batch_size: int = Field(256, ge=1, description="Examples per step when evaluating.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW or SGD with momentum.")
    weight_decay: float = Field(0.01, ge=0, description="Decoupled weight decay.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Nesterov).")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="After linear warmup: cosine decay to zero, or constant."
    )
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="Max gradient norm; unset: no clipping.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 runs the forward pass under autocast.")
    max_failures: int = Field(
        2, ge=-1, description="Worker-group restarts from the last checkpoint; -1: unlimited."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Best N epoch checkpoints kept (plus the latest).")
    metric: Literal["val_accuracy", "val_macro_f1", "val_loss"] = Field(
        "val_accuracy", description="Picks the best epoch; val_loss is minimised, the others maximised."
    )
    shuffle_buffer: int = Field(1024, ge=0, description="Rows in each worker's local shuffle buffer.")

    @property
    def metric_mode(self) -> str:
        return "min" if self.metric == "val_loss" else "max"


class ScalingConfig(_Section):
    """How many DDP workers and what each one holds."""

    num_workers: int = Field(2, ge=1, description="DDP training workers (one process each).")
    use_gpu: bool = Field(False, description="One GPU per worker and the NCCL backend; else CPU and gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each training worker.")
    data_cpus: float = Field(
        0.5, gt=0, description="CPUs left free for Ray Data while training (preprocessing tasks)."
    )


class StorageConfig(_Section):
    """Where runs are written."""

    runs_dir: str = Field("runs", description="Run directories go to <runs_dir>/<name>/.")
    storage_path: Optional[str] = Field(
        None,
        description="Ray Train/Tune persistent storage (shared filesystem path or s3://), needed "
        "on multi-node clusters. Unset: <runs_dir>/<name>/ray.",
    )


class Config(_Section):
    """One experiment."""

    name: str = Field(description="Experiment name: the run directory and the served model's name.")
    seed: int = Field(0, description="Seeds model init, shuffling and augmentation.")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    storage: StorageConfig = StorageConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
            raise ValueError(
                "must be 1-100 characters of letters, digits, '_', '.', '-', starting with a letter or digit"
            )
        return name

    def run_dir(self) -> Path:
        return Path(self.storage.runs_dir).expanduser().resolve() / self.name

    def resolved_storage_path(self) -> str:
        if self.storage.storage_path:
            sp = self.storage.storage_path
            return sp if "://" in sp else str(Path(sp).expanduser().resolve())
        return str(self.run_dir() / "ray")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: list[str]) -> "Config":
        return validate(apply_overrides(self.to_dict(), overrides))


# --- loading ------------------------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("rayfine.configs").iterdir() if p.name.endswith(".yaml"))


def _read_raw(path_or_name: str | Path) -> dict[str, Any]:
    path = Path(path_or_name).expanduser()
    if path.is_file():
        text = path.read_text()
    else:
        name = str(path_or_name).removesuffix(".yaml")
        preset = resources.files("rayfine.configs") / f"{name}.yaml"
        if "/" in name or not preset.is_file():
            raise ConfigError(
                [f"no config file or preset named {str(path_or_name)!r}; presets: {', '.join(preset_names())}"]
            )
        text = preset.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{path_or_name}: not valid YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path_or_name}: the top level must be a mapping, got {type(raw).__name__}"])
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values are YAML scalars or flow lists) to a raw dict."""
    raw = _deep_copy(raw)
    errors = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            errors.append(f"override {item!r}: expected dotted.key=value, e.g. train.lr=3e-4")
            continue
        try:
            value = _parse_scalar(text)
        except yaml.YAMLError as e:
            errors.append(f"override {item!r}: value is not valid YAML: {e}")
            continue
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                errors.append(f"override {item!r}: {part!r} is a value, not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    if errors:
        raise ConfigError(errors)
    return raw


def _parse_scalar(text: str) -> Any:
    value = yaml.safe_load(text) if text.strip() else ""
    # YAML 1.1 reads 3e-4 as a string; users mean a number.
    if isinstance(value, str):
        try:
            number = float(value)
            if math.isfinite(number) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
                return number
        except ValueError:
            pass
    return value


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep_copy(v) for v in obj]
    return obj


def validate(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError([_describe(err) for err in e.errors()]) from None


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        section = _section_at(err["loc"][:-1])
        allowed = ", ".join(section.model_fields) if section else "?"
        return f"{loc}: unknown field; allowed here: {allowed}"
    if kind == "missing":
        return f"{loc}: required field is missing"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg} (got {err.get('input')!r})"


def _section_at(loc: tuple) -> Optional[type[BaseModel]]:
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def load_config(path_or_name: str | Path, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML file or a preset name, apply dotted overrides, validate once."""
    return validate(apply_overrides(_read_raw(path_or_name), list(overrides or [])))


def config_reference() -> str:
    """The README's config reference table, generated from the field declarations above."""
    rows = ["| field | default | meaning |", "| --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else f"`{field.default!r}`".replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {default} | {(field.description or '').replace('|', chr(92) + '|')} |")

    walk(Config, "")
    return "\n".join(rows)
