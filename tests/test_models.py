"""Model builders (unit tier)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from rayfine.config import ModelConfig
from rayfine.models import build_model


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_resnets_take_small_grayscale_images(name):
    model = build_model(ModelConfig(name=name), num_labels=7, in_channels=1, image_size=8).eval()
    with torch.inference_mode():
        assert model(x=torch.randn(2, 1, 8, 8)).shape == (2, 7)


def test_stem_choice():
    small = build_model(ModelConfig(), 10, in_channels=3, image_size=32)
    large = build_model(ModelConfig(), 10, in_channels=3, image_size=224)
    assert small.net.conv1.stride == (1, 1) and isinstance(small.net.maxpool, torch.nn.Identity)
    assert large.net.conv1.stride == (2, 2) and isinstance(large.net.maxpool, torch.nn.MaxPool2d)
    forced = build_model(ModelConfig(stem="imagenet"), 10, in_channels=1, image_size=32)
    assert forced.net.conv1.in_channels == 1 and forced.net.conv1.stride == (2, 2)


def test_weights_from_a_safetensors_file_load_where_shapes_match(tmp_path):
    donor = build_model(ModelConfig(stem="imagenet"), 1000, in_channels=3, image_size=224)
    save_file({k: v.contiguous() for k, v in donor.net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = build_model(ModelConfig(weights=str(tmp_path / "w.safetensors")), 10, in_channels=1, image_size=16)
    # The body comes from the file; the (changed) stem and the new head do not.
    assert torch.equal(model.net.layer1[0].conv1.weight, donor.net.layer1[0].conv1.weight)
    assert model.net.fc.out_features == 10


def test_weights_file_that_fits_nothing_is_an_error(tmp_path):
    save_file({"unrelated": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="no tensor"):
        build_model(ModelConfig(weights=str(tmp_path / "w.safetensors")), 10, in_channels=1, image_size=16)
