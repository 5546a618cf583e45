"""Image preprocessing shared by training and serving (unit tier)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rayfine.config import DataConfig
from rayfine.data.images import (
    ImageError,
    augment_batch,
    decode_image,
    normalization,
    prepare_image,
    preprocess_for_model,
    resize_square,
    to_model_input,
    to_pixel_values,
)


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def cfg(**kw) -> DataConfig:
    return DataConfig(source="builtin:digits", **{"image_size": 16, "color_mode": "L", **kw})


@pytest.fixture
def digit(digits):
    images, labels = digits
    return images[0]


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "LA"])
def test_every_pixel_mode_becomes_the_configured_shape(digit, mode):
    img = Image.fromarray(digit).convert(mode) if mode != "I;16" else Image.fromarray(digit.astype(np.uint16) * 257)
    reference = prepare_image(encode(Image.fromarray(digit)), cfg()).astype(float).ravel()
    for color_mode, channels in (("L", 1), ("RGB", 3)):
        out = prepare_image(encode(img), cfg(color_mode=color_mode))
        assert out.shape == (16, 16, channels) and out.dtype == np.uint8
        # The same digit in every mode (a palette image is quantized, hence correlation).
        gray = out.astype(float).mean(axis=2).ravel()
        assert np.corrcoef(gray, reference)[0, 1] > 0.95


def test_sixteen_bit_gray_is_scaled_not_clipped(digit):
    out16 = prepare_image(encode(Image.fromarray(digit.astype(np.uint16) * 257)), cfg())
    out8 = prepare_image(encode(Image.fromarray(digit)), cfg())
    assert np.abs(out16.astype(int) - out8.astype(int)).max() <= 2


def test_transparent_pixels_are_composited_on_black():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = 255  # white, but fully transparent...
    rgba[:5, :, 3] = 255  # ...except the top half
    out = prepare_image(encode(Image.fromarray(rgba, "RGBA")), cfg(image_size=10))
    assert out[:5].min() == 255 and out[5:].max() == 0


def test_a_transparent_colour_in_a_grayscale_png_is_composited_on_black():
    gray = np.full((10, 10), 200, np.uint8)
    gray[5:] = 17  # the colour marked transparent (PNG's tRNS chunk)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG", transparency=17)
    out = prepare_image(buf.getvalue(), cfg(image_size=10))
    assert out[:5].min() == 200 and out[5:].max() == 0


@pytest.mark.parametrize("fmt", ["JPEG", "MPO", "PNG", "WEBP", "TIFF"])
def test_exif_orientation_is_applied_in_every_format_that_carries_it(fmt):
    """Orientation 6 (what a phone held upright writes): the stored pixels are shown turned 90
    degrees clockwise. MPO is what Pillow opens a phone's JPEG with a gain or depth map as."""
    stored = np.zeros((8, 16), np.uint8)  # wide as stored: four vertical stripes
    stored[:, :4], stored[:, 4:8], stored[:, 8:12] = 255, 170, 85
    exif = Image.Exif()
    exif[0x0112] = 6  # ExifTags.Base.Orientation
    buf = io.BytesIO()
    options = {"JPEG": {"quality": 100}, "WEBP": {"lossless": True},
               "MPO": {"quality": 100, "save_all": True, "append_images": [Image.fromarray(stored)]}}.get(fmt, {})
    Image.fromarray(stored).save(buf, format=fmt, exif=exif, **options)
    assert Image.open(io.BytesIO(buf.getvalue())).format == fmt
    out = prepare_image(buf.getvalue(), cfg(image_size=8))[..., 0].astype(int)
    upright = np.rot90(stored, k=-1)[4:12].astype(int)  # turned clockwise (16x8), center-cropped to 8x8
    assert np.abs(out - upright).max() <= 8  # JPEG's rounding; unturned, rows would differ by 255


def test_resize_keeps_aspect_by_center_crop():
    img = Image.new("L", (40, 20))
    img.paste(255, (10, 0, 30, 20))  # a bright square in the middle
    out = np.asarray(resize_square(img, 10))
    assert out.shape == (10, 10) and out.min() > 200  # the crop is the bright middle


def test_pixel_arrays_are_accepted(digit):
    from_uint8 = prepare_image(digit, cfg())
    from_float = prepare_image(digit.astype(np.float32) / 255.0, cfg())
    from_hwc = prepare_image(np.repeat(digit[:, :, None], 3, axis=2), cfg())
    assert np.abs(from_uint8.astype(int) - from_float.astype(int)).max() <= 1
    assert np.abs(from_uint8.astype(int) - from_hwc.astype(int)).max() <= 1


@pytest.mark.parametrize(
    "data, message",
    [
        (b"not an image at all", "not a readable image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not a readable image"),
        (np.zeros((4, 4, 2)), "pixel array must be"),
        (np.full((4, 4), np.nan), "finite"),
        (np.full((4, 4), 300.0), "[0, 255]"),
    ],
)
def test_bad_inputs_raise_image_error(data, message):
    with pytest.raises(ImageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        prepare_image(data, cfg())


def test_truncated_png_is_refused(digit):
    data = encode(Image.fromarray(digit).resize((64, 64)))
    with pytest.raises(ImageError):
        prepare_image(data[: len(data) // 2], cfg())


def test_pixel_limit_refuses_before_decoding():
    from net_tools import bomb_png

    big = encode(Image.new("L", (300, 300)))
    with pytest.raises(ImageError, match="more than the limit of 10000"):
        prepare_image(big, cfg(max_image_pixels=10_000))
    # A header that claims 300x300 over 64 bytes of pixels: decoding would fail on the data, so
    # the limit's message shows that the header alone was read.
    with pytest.raises(ImageError, match="300x300 pixels, more than the limit of 10000"):
        prepare_image(bomb_png(300, 300), cfg(max_image_pixels=10_000))


def photo(width: int, height: int) -> Image.Image:
    """A smooth RGB picture with detail at every scale (upsampled noise plus fine noise)."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    fine = rng.integers(-20, 21, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, int) + fine, 0, 255).astype(np.uint8))


def test_large_jpeg_is_decoded_at_reduced_scale_with_the_same_pixels():
    """A JPEG many times the model's size decodes at 1/8 scale (PIL's draft mode) and still gives
    what decoding it whole gives, to within two levels of 255; other formats and small JPEGs decode whole."""
    jpeg = encode(photo(2400, 1800), "JPEG")
    data_cfg = cfg(image_size=64, color_mode="RGB")
    # 1/8, PIL's smallest scale, leaves 300x225: both sides still at least 3 x 64.
    assert decode_image(jpeg, data_cfg.max_image_pixels, min_side=64).size == (300, 225)
    assert decode_image(jpeg, data_cfg.max_image_pixels).size == (2400, 1800)
    whole = prepare_image(decode_image(jpeg, data_cfg.max_image_pixels), data_cfg)  # the same steps, decoded whole
    out = prepare_image(jpeg, data_cfg)
    assert out.shape == (64, 64, 3)
    diff = np.abs(out.astype(int) - whole.astype(int))
    # Not 0: prepare_image took the reduced-scale path.
    assert 0 < diff.max() <= 2 and diff.mean() < 0.3, (diff.max(), diff.mean())
    assert decode_image(jpeg, data_cfg.max_image_pixels, min_side=400).size == (2400, 1800)  # 1/2 would leave 900 < 1200
    png = encode(photo(600, 450))
    assert decode_image(png, data_cfg.max_image_pixels, min_side=64).size == (600, 450)
    # The pixel limit is the image's own size, not the reduced one.
    with pytest.raises(ImageError, match="2400x1800 pixels, more than the limit of 1000000"):
        prepare_image(jpeg, cfg(image_size=64, color_mode="RGB", max_image_pixels=1_000_000))


def test_a_jpeg_is_decoded_at_reduced_scale_only_at_a_scale_that_divides_its_sides():
    """At a scale that does not divide a side, PIL's draft decodes a last row or column that stands
    for a partial block, and every resized pixel moves: up to 48 levels of 255 off decoding whole.
    Such a JPEG decodes at the largest smaller scale that divides both sides, or whole."""
    data_cfg = cfg(image_size=64, color_mode="RGB")
    # (size, what it decodes at for 64 px: 3 x 64 = 192 px a side at least)
    for size, decoded in (((2401, 1800), (2401, 1800)), ((2400, 1801), (2400, 1801)),
                          ((2404, 1802), (1202, 901))):  # 1/8 and 1/4 leave a partial block; 1/2 does not
        jpeg = encode(photo(*size), "JPEG")
        assert decode_image(jpeg, data_cfg.max_image_pixels, min_side=64).size == decoded, size
        whole = prepare_image(decode_image(jpeg, data_cfg.max_image_pixels), data_cfg)
        diff = np.abs(prepare_image(jpeg, data_cfg).astype(int) - whole.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.3, (size, diff.max(), diff.mean())
    # A phone photo's sides are multiples of 8: it keeps the fast path (bench/ingest.py's phone_photos).
    phone = encode(Image.new("RGB", (4032, 3024), (90, 120, 150)), "JPEG")
    assert decode_image(phone, data_cfg.max_image_pixels, min_side=224).size == (1008, 756)


def test_transformers_image_processor_crops_the_same_pixels(tmp_path):
    """The preprocessor_config.json an RGB checkpoint carries, loaded by transformers (PIL backend),
    gives rayfine's pixel values: the same resized sizes (the long side truncated, 4:3 photos
    included) and crop offsets: exactly below a 3x reduction, and within the few levels of 255 that
    reducing_gap and reduced-scale JPEG decoding make above it."""
    import json

    from transformers import AutoImageProcessor

    from rayfine.data.images import hf_image_processor_config, to_model_input

    def levels(image: Image.Image, data_cfg: DataConfig) -> float:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(hf_image_processor_config(data_cfg)))
        processor = AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")
        data = encode(image, "JPEG")
        theirs = processor(Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"]
        ours = to_model_input(prepare_image(data, data_cfg)[None], data_cfg)
        assert theirs.shape == ours.shape
        return float(np.abs(theirs - ours).max() * max(processor.image_std) * 255)

    for size, image_size in (((640, 480), 224), ((480, 640), 224), ((160, 120), 50), ((300, 169), 100)):
        assert levels(photo(*size), cfg(image_size=image_size, color_mode="RGB")) < 1e-3, size
    assert levels(photo(2400, 1800), cfg(image_size=64, color_mode="RGB")) <= 4.01


def test_normalization_and_layout():
    data_cfg = cfg(color_mode="RGB", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    images = np.stack([np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8)])
    x = to_model_input(images, data_cfg)
    assert x.shape == (2, 3, 16, 16) and x.dtype == np.float32
    assert np.allclose(x[0], -1.0) and np.allclose(x[1], 1.0)
    mean, std = normalization(cfg())
    assert mean.shape == (1,) and std.shape == (1,)


def test_augmentation_changes_pixels_but_not_shape_or_range_and_a_seed_repeats_it(digit):
    import torch

    data_cfg = cfg(hflip=True)
    images = np.stack([prepare_image(digit, data_cfg)] * 8)
    plain = torch.from_numpy(to_model_input(images, data_cfg))

    def augmented(seed: int) -> torch.Tensor:
        return augment_batch(plain.clone(), data_cfg, torch.Generator().manual_seed(seed))

    first = augmented(0)
    assert first.shape == plain.shape and first.dtype == plain.dtype
    assert not torch.allclose(first, plain)
    # Each image of the batch is drawn on its own: eight copies of one digit come out different.
    assert len({tuple(img.flatten().tolist()) for img in first}) == 8
    # Within the range that normalization gives black and white.
    lo, hi = to_model_input(np.stack([np.zeros_like(images[0]), np.full_like(images[0], 255)]), data_cfg)
    assert first.min() >= lo.min() - 1e-5 and first.max() <= hi.max() + 1e-5
    # The generator's seed alone decides the draws.
    assert torch.equal(augmented(0), first)
    assert not torch.equal(augmented(1), first)


def test_normalization_tensors_are_made_once_a_device_and_outlive_inference_mode(digit):
    """to_pixel_values and augment_batch keep mean and std on the batch's device (a copy from the
    host to a GPU in every step waits for the GPU's queued work). Made first under validation's
    inference_mode, they must still work in a computation autograd tracks."""
    import torch

    from rayfine.data.images import _normalization_on

    _normalization_on.cache_clear()
    data_cfg = cfg(hflip=True)
    images = torch.from_numpy(np.stack([prepare_image(digit, data_cfg)] * 4))
    with torch.inference_mode():
        evaluated = to_pixel_values(images, data_cfg)
    x = to_pixel_values(images, data_cfg).requires_grad_()
    assert _normalization_on.cache_info().misses == 1 and torch.equal(x.detach(), evaluated)
    augment_batch(x, data_cfg, torch.Generator().manual_seed(0)).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_serving_preprocessing_equals_training_path(digit):
    """Bytes in a request give exactly the tensor the training pipeline made from the same file."""
    data_cfg = cfg()
    png = encode(Image.fromarray(digit))
    served = preprocess_for_model([png, digit], data_cfg)
    # Training normalizes in torch, on the batch's device (rayfine.data.model_batch).
    trained = to_pixel_values(torch.from_numpy(np.stack([prepare_image(png, data_cfg)])), data_cfg).numpy()
    assert np.array_equal(served[0], trained[0])
    assert np.array_equal(served[1], trained[0])


def test_torch_and_numpy_normalization_agree():
    rng = np.random.default_rng(0)
    for data_cfg in (cfg(), cfg(color_mode="RGB"), cfg(color_mode="RGB", mean=(0.1, 0.2, 0.3), std=(0.9, 0.8, 0.7))):
        channels = 3 if data_cfg.color_mode == "RGB" else 1
        images = rng.integers(0, 256, (5, 12, 12, channels), dtype=np.uint8)
        x = to_pixel_values(torch.from_numpy(images), data_cfg)
        assert x.dtype == torch.float32 and x.shape == (5, channels, 12, 12) and x.is_contiguous()
        assert np.array_equal(x.numpy(), to_model_input(images, data_cfg))


@pytest.mark.parametrize("color_mode", ["L", "RGB"])
def test_serving_batches_have_training_strides_and_convolutions_stay_nchw(digit, color_mode):
    """A 1-channel NHWC batch transposed to NCHW has channels-last strides and still counts as
    contiguous; given those, PyTorch runs a convolution channels-last (converting its weights on
    every call, twice the time of a served digits model). Serving must hand the model what training
    does: plain NCHW strides."""
    data_cfg = cfg(color_mode=color_mode)
    channels = 3 if color_mode == "RGB" else 1
    png = encode(Image.fromarray(digit))
    served = torch.from_numpy(preprocess_for_model([png, digit, png], data_cfg))
    trained = to_pixel_values(torch.from_numpy(np.stack([prepare_image(png, data_cfg)] * 3)), data_cfg)
    _, c, h, w = served.shape
    assert c == channels and served.stride() == trained.stride() == (c * h * w, h * w, w, 1)
    conv = torch.nn.Conv2d(channels, 8, kernel_size=3, padding=1).eval()
    with torch.inference_mode():
        out = conv(served)
    assert out.is_contiguous() and not out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("size", [(1, 1000), (1000, 1)])
def test_a_tiny_long_image_is_refused_before_its_resize_outgrows_the_pixel_limit(size):
    """A 1x1000 image passes the pixel limit (1,000 pixels), but resized to 16 px on its short side
    it would have 16x16000: the limit applies to that too, checked before resizing (a 100-byte
    1x20000 PNG at 224 px would need a gigabyte, a 1x20,000,000 one more than PIL can allocate)."""
    width, height = size
    resized = f"{16 * width}x{16 * height}"
    with pytest.raises(ImageError, match=f"{width}x{height} pixels would be resized to {resized} .* limit of 100000"):
        prepare_image(encode(Image.new("L", size, 255)), cfg(max_image_pixels=100_000))
    with pytest.raises(ImageError, match=f"resized to {resized} .* limit of 100000"):  # pixel arrays too
        prepare_image(np.zeros((height, width), np.uint8), cfg(max_image_pixels=100_000))
    assert prepare_image(encode(Image.new("L", size, 255)), cfg(max_image_pixels=256_000)).min() == 255  # within it


def test_an_image_too_long_for_pil_to_resize_is_refused_not_an_overflow():
    wide = encode(Image.new("L", (20_000_000, 1)))  # 19 kB
    with pytest.raises(ImageError, match="20000000x1 pixels would be resized to 4480000000x224 before the center crop"):
        prepare_image(wide, cfg(image_size=224))


def test_a_float_image_is_read_as_the_same_values_given_as_a_pixel_array():
    """A float32 TIFF (PIL's mode F) in [0, 1] or [0, 255] gives what the same array gives
    (``array_to_image``), and one with NaN is refused as that array is."""
    values = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    for scaled in (values, values * 255):
        tiff = encode(Image.fromarray(scaled, "F"), "TIFF")
        assert Image.open(io.BytesIO(tiff)).mode == "F"
        out = prepare_image(tiff, cfg(image_size=10))
        assert np.array_equal(out, prepare_image(scaled, cfg(image_size=10))) and out.max() == 255
    values[3, 3] = np.nan
    with pytest.raises(ImageError, match="finite"):
        prepare_image(encode(Image.fromarray(values, "F"), "TIFF"), cfg(image_size=10))


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("WEBP", {"lossless": True})])
def test_an_unreadable_exif_block_is_ignored(digit, fmt, options):
    """PIL parses a PNG's or WebP's EXIF only when asked (``getexif``), and raises on a malformed
    one; the pixels are fine, so it is ignored, as PIL's JPEG reader ignores a malformed one."""
    img = Image.fromarray(digit)
    buf, plain = io.BytesIO(), io.BytesIO()
    img.save(buf, fmt, exif=b"Exif\x00\x00XX\x00*garbage", **options)
    img.save(plain, fmt, **options)
    with pytest.raises(SyntaxError):
        Image.open(io.BytesIO(buf.getvalue())).getexif()
    assert np.array_equal(prepare_image(buf.getvalue(), cfg()), prepare_image(plain.getvalue(), cfg()))


@pytest.mark.parametrize("item, message", [
    ([[1, 2], [3]], "ValueError: setting an array element with a sequence"),  # ragged nested lists
    (Image.new("La", (4, 4)), "ValueError: conversion from La to L not supported"),
])
def test_any_failure_on_an_input_is_an_image_error_that_names_it(item, message):
    """Whatever numpy or PIL raise on an input is the input's fault: an ImageError (a bad row in
    training, a 400 in serving), never an exception that ends a Ray Data task or answers 500."""
    with pytest.raises(ImageError, match=f"image could not be prepared: {message}"):
        prepare_image(item, cfg())


def test_serving_applies_its_own_pixel_limit_to_the_resized_image():
    """Serving prepares images with the checkpoint's data config under serve.max_image_pixels
    (``serving_config``, then ``Preprocessor``). A 1x100 image at 224 px would be resized to
    224x22400, 5.0 M pixels: within training's limit (40 M), over serving's (4 M). Refused with an
    InputError, as is any input that fails, so that the request gets a 400 that says why."""
    from rayfine.config import ServeConfig, load_config
    from rayfine.data import Preprocessor
    from rayfine.errors import InputError
    from rayfine.serve.model import serving_config

    trained = load_config("resnet18_digits", ["data.image_size=224"])
    data = encode(Image.new("L", (1, 100)))
    assert prepare_image(data, trained.data).shape[:2] == (224, 224)
    serve = Preprocessor(serving_config(trained, ServeConfig()))
    with pytest.raises(InputError, match="1x100 pixels would be resized to 224x22400 .* limit of 4000000"):
        serve([data])
    with pytest.raises(InputError, match="ValueError"):
        serve([[[1, 2], [3]]])


def test_a_parquet_cell_that_is_not_an_image_says_what_it_is():
    """A null cell of an all-null column arrives as NaN; a column of file paths, or Spark's image
    struct, is not encoded images."""
    from rayfine.data.sources import _struct_image

    with pytest.raises(ImageError, match=r"^no image \(empty, or its file is missing or unreadable\)$"):
        prepare_image(float("nan"), cfg())
    with pytest.raises(ImageError, match=r"the image is a string \('/data/imgs/0.png'; a column of file paths\?\): "
                                         r"images are read from encoded image bytes or Hugging Face's \{bytes, path\}"):
        prepare_image("/data/imgs/0.png", cfg())
    spark = {"origin": "file:/x/0.png", "height": 12, "width": 12, "nChannels": 3, "mode": 16, "data": b"\0" * 432}
    image, file = _struct_image(spark, "image", ".")
    assert file is None
    with pytest.raises(ImageError, match=r"the image is a struct of fields \['data', 'height', 'mode', 'nChannels', "
                                         r"'origin', 'width'\]: .*\(fields bytes and path\)"):
        prepare_image(image, cfg())


def _gray_tiff(values: np.ndarray, bits: int, signed: bool) -> bytes:
    """A minimal uncompressed grayscale TIFF of ``bits``-bit samples (packed MSB first for 12), as
    scanners, microscopes and elevation tools write them."""
    import struct

    h, w = values.shape
    if bits == 12:
        rows = []
        for row in values:
            text = "".join(format(int(v), "012b") for v in row)
            text += "0" * (-len(text) % 8)
            rows.append(int(text, 2).to_bytes(len(text) // 8, "big"))
        data = b"".join(rows)
    else:
        data = values.astype("<i2" if signed else "<u2").tobytes()
    entries = [(256, 3, w), (257, 3, h), (258, 3, bits), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 1),
               (278, 3, h), (279, 4, len(data)), (339, 3, 2 if signed else 1)]
    offset = 8 + 2 + len(entries) * 12 + 4
    out = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, kind, value in entries:
        value = offset if tag == 273 else value
        out += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    return out + b"\x00\x00\x00\x00" + data


def test_integer_tiffs_are_scaled_by_the_depth_they_record():
    """A 12-bit TIFF (opened by Pillow as 16-bit) and a signed 16-bit one are scaled by the depth
    their tags record, the same for every file of a dataset: full scale is white, and a brighter
    exposure is never darker (was: a per-image guess from the peak, 12-bit white came out 16 of 255
    and a signed gradient to 256 nearly black while one to 255 was full range)."""
    gradient = np.tile(np.linspace(0, 1, 16), (16, 1))
    white = prepare_image(_gray_tiff(np.full((16, 16), 4095), 12, signed=False), cfg(image_size=16))
    assert white.min() == white.max() == 255
    rows = {}
    for peak in (255, 256, 20000, 32767):
        data = _gray_tiff(np.round(gradient * peak).astype(np.int16), 16, signed=True)
        rows[peak] = prepare_image(data, cfg(image_size=16))[0, :, 0].astype(int)
    assert rows[32767].max() == 255 and rows[32767][0] == 0
    assert all((rows[a] <= rows[b]).all() for a, b in ((255, 256), (256, 20000), (20000, 32767)))
    assert rows[255].max() == 2  # 255 of 32767: dark, as recorded
    negative = _gray_tiff(np.full((16, 16), -1000, dtype=np.int16), 16, signed=True)
    assert prepare_image(negative, cfg(image_size=16)).max() == 0
    # Unsigned 16-bit, as before: 32768 is 128.
    half = prepare_image(_gray_tiff(np.full((16, 16), 32768), 16, signed=False), cfg(image_size=16))
    assert half.min() == half.max() == 128
    # 32-bit integers: Pillow saves every int32 image with that depth, 8-bit data too; the values'
    # range scales it, as before.
    buf = io.BytesIO()
    Image.fromarray(np.round(gradient * 255).astype(np.int32)).save(buf, format="TIFF")
    assert prepare_image(buf.getvalue(), cfg(image_size=16))[0, :, 0].max() == 255
