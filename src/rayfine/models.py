"""Model builders: ``build_model(model_cfg, num_labels, ...)`` -> an ``nn.Module`` whose
``forward(**inputs)`` returns logits of shape (batch, num_labels).

    model = build_model(cfg.model, num_labels=10, in_channels=1, image_size=16)
    logits = model(x=torch.randn(4, 1, 16, 16))

A registry of small builder functions (torchtune's ``_model_builders.py`` style): add a family by
adding a function and a registry entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from rayfine.config import ModelConfig


def _resnet(model_cfg: ModelConfig, num_labels: int, in_channels: int, image_size: int) -> nn.Module:
    import torchvision

    weights = None
    if model_cfg.weights and not model_cfg.weights.endswith(".safetensors"):
        # A torchvision weights name, e.g. IMAGENET1K_V1: loaded from the local torch hub cache.
        weights = torchvision.models.get_model_weights(model_cfg.name)[model_cfg.weights]
    model = torchvision.models.get_model(model_cfg.name, weights=weights)
    stem = model_cfg.stem
    if stem == "auto":
        stem = "small" if image_size < 64 else "imagenet"
    if stem == "small":
        # CIFAR-style stem: a 3x3 stride-1 conv and no max-pool, so 8-32 px inputs keep their
        # spatial detail through the four stages instead of collapsing to 1x1 after the stem.
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        pretrained = model.conv1.weight.detach()
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if weights is not None:
            # Grayscale from RGB weights: sum over the colour channels (same response to gray input).
            with torch.no_grad():
                model.conv1.weight.copy_(pretrained.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels)
    model.fc = nn.Linear(model.fc.in_features, num_labels)
    if model_cfg.weights and model_cfg.weights.endswith(".safetensors"):
        _load_partial(model, model_cfg.weights)
    return ImageClassifier(model)


def _load_partial(model: nn.Module, path: str) -> None:
    """Load matching tensors from a safetensors file (the head and a changed stem may differ)."""
    from safetensors.torch import load_file

    state = load_file(str(Path(path).expanduser()))
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"model.weights: no tensor in {path} matches {type(model).__name__}'s parameters")
    model.load_state_dict(usable, strict=False)


class ImageClassifier(nn.Module):
    """Wraps a vision network so every model takes keyword inputs: ``model(x=images)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


Builder = Callable[[ModelConfig, int, int, int], nn.Module]
MODEL_BUILDERS: dict[str, Builder] = {"resnet18": _resnet, "resnet34": _resnet, "resnet50": _resnet}


def build_model(model_cfg: ModelConfig, num_labels: int, *, in_channels: int = 3, image_size: Optional[int] = None) -> nn.Module:
    """A freshly initialized (or weight-loaded) classifier with a ``num_labels``-way head."""
    builder = MODEL_BUILDERS.get(model_cfg.name)
    if builder is None:
        raise ValueError(f"model.name: unknown model {model_cfg.name!r}; allowed: {', '.join(MODEL_BUILDERS)}")
    return builder(model_cfg, num_labels, in_channels, image_size or 224)


def model_for_config(cfg, num_labels: int) -> nn.Module:
    """The model a whole experiment config describes (input shape from its data section)."""
    return build_model(cfg.model, num_labels, in_channels=cfg.data.channels, image_size=cfg.data.image_size)
