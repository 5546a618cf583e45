"""Image preprocessing shared by training (inside Ray Data ``map_batches``) and serving.

Two stages, so that the expensive one runs once:
1. ``prepare_image``: decode bytes (or take a pixel array), convert to the configured color mode
   (transparent images composited on black), resize the shorter side and center-crop to a square
   of ``image_size``. Output: uint8 HxWxC. Training materializes this once.
2. Normalization: uint8 NxHxWxC -> float32 NxCxHxW normalized, where a batch is consumed: in the
   training loop and evaluation on the batch's device (``to_pixel_values``, torch; Ray Data ships
   the uint8 images, a quarter of float32's bytes), and on every served request
   (``to_model_input``, numpy). The two give the same values.
Train-time augmentation (``augment_batch``) runs in the training loop, on the worker's device,
with a generator seeded per (seed, epoch, rank): a seed reproduces a run, resumed runs included.
"""

from __future__ import annotations

import functools
import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps

from rayfine.config import DataConfig
from rayfine.errors import InputError

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The file name extensions Pillow registers for ACCEPTED_FORMATS (Image.registered_extensions()):
# .jfif and .jpe are JPEG files too (Windows saves web images as .jfif).
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp", "jfif", "jpe")
# Formats PIL may decode for us; anything else (e.g. EPS, which runs Ghostscript) is refused.
ACCEPTED_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF", "TIFF", "WEBP")
# A reduction by this factor or more first averages whole pixel blocks (PIL's reducing_gap; for a
# JPEG, decoding at 1/2, 1/4 or 1/8 scale), then resizes bilinearly by less than this factor.
REDUCING_GAP = 3.0


class ImageError(InputError):
    """An input that cannot become an image of the configured kind."""


# Which settings a pixel limit comes from: training and evaluation apply data.max_image_pixels, a
# replica the smaller of that and serve.max_image_pixels (4 MP by default: a 12 MP phone photo is over).
PIXEL_SETTINGS = "(data.max_image_pixels; when serving, serve.max_image_pixels too)"


def openable_formats() -> tuple[str, ...]:
    """ACCEPTED_FORMATS that this Pillow registers an opener for: Pillow 13 opens MPO files with
    its JPEG opener and has no MPO entry, and asking for an unregistered format raises KeyError."""
    Image.init()
    return tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)


def decode_image(data: bytes, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """Decode encoded image bytes, refusing unknown formats and oversized images before decoding.

    With ``min_side``, a JPEG whose sides both exceed ``REDUCING_GAP * min_side`` at least twice
    over is decoded at 1/2, 1/4 or 1/8 scale (PIL's draft mode: the decoder drops the higher
    frequencies), keeping both sides at least ``REDUCING_GAP * min_side``, as ``Image.thumbnail``
    does, at the largest of those scales that divides both sides (``draft_scale``; none: decoded
    whole): a 12-megapixel phone photo (4032x3024) is prepared at 224 px 2-4x faster
    (bench/ingest.py's phone_photos). The resized pixels differ from those of decoding it whole
    (the decoder's reduced DCT is not quite each block's average): for phone photos at 224 px by at
    most 2 levels of 255; measured over sizes, scales and image sizes, by 0.1-0.45 levels on
    average and up to ~10 at single pixels of detailed photos.
    ``max_pixels`` applies to the image's own size."""
    try:
        img = Image.open(io.BytesIO(data), formats=openable_formats())
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from None
    except Exception as e:
        raise ImageError(f"not a readable image ({', '.join(ACCEPTED_FORMATS)}): {type(e).__name__}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(f"image has {width}x{height} pixels, more than the limit of {max_pixels} {PIXEL_SETTINGS}")
    scale = draft_scale(width, height, round(REDUCING_GAP * min_side)) if min_side is not None else 1
    if scale > 1:
        # PIL's draft picks the largest of 8, 4, 2, 1 at most min(width // w, height // h) for a
        # requested (w, h): asking for exactly 1/scale of both sides makes it pick ``scale``.
        img.draft(None, (width // scale, height // scale))  # a no-op but for JPEG (and MPO) files
    try:
        img.load()
    except Exception as e:
        raise ImageError(f"corrupt image data: {type(e).__name__}: {e}") from None
    return img


def draft_scale(width: int, height: int, side: int) -> int:
    """The reduced scale to decode a JPEG of ``width`` x ``height`` at: the largest of 8, 4 and 2
    that leaves both sides at least ``side`` and divides both sides, else 1 (decode whole).

    Divides, because at a scale that does not, PIL's draft decodes ceil(width / scale) x
    ceil(height / scale) pixels whose last column and row stand for a partial block, so that the
    resize maps every pixel a fraction of a pixel off where decoding whole puts it: measured up to
    ~30 levels of 255 (1.5 on average) on a 4000x3001 photo at 224 px."""
    fits = min(width // side, height // side)
    return next((s for s in (8, 4, 2) if s <= fits and width % s == 0 and height % s == 0), 1)


def array_to_image(arr: np.ndarray) -> Image.Image:
    """A HxW, HxWx1, HxWx3 or HxWx4 pixel array (uint8, or floats in [0, 1]) as a PIL image."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"pixel array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {list(arr.shape)}")
    if min(arr.shape[:2]) < 1:
        raise ImageError(f"pixel array is empty: shape {list(arr.shape)}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
            raise ImageError("pixel values must be finite numbers")
        if arr.min() < 0 or arr.max() > 255:
            raise ImageError("pixel values must lie in [0, 255] (or [0, 1] for floats)")
        scale = 255.0 if np.issubdtype(arr.dtype, np.floating) and arr.max() <= 1.0 else 1.0
        arr = np.round(arr.astype(np.float64) * scale).astype(np.uint8)
    return Image.fromarray(arr)


def exif_orientation(img: Image.Image) -> int:
    """The image's EXIF orientation (1, upright, when it has none or it cannot be read).

    An unreadable EXIF block is ignored, as PIL's JPEG reader itself ignores one: the pixels are
    fine without it. (PIL parses a PNG's or WebP's EXIF only when asked, and ``getexif()`` raises
    SyntaxError, struct.error, ... on a malformed one.)"""
    try:
        return img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 (any parse failure means: no orientation we can trust)
        return 1


def convert_mode(img: Image.Image, color_mode: str) -> Image.Image:
    """Upright, to L or RGB; alpha (RGBA, LA, a palette's or a PNG's transparent colour) is
    composited on black."""
    depth_scale = _recorded_depth_scale(img)  # read before a transpose copies the image without its tags
    # EXIF orientation, in any format that carries it: JPEG, MPO (phone photos with a gain or
    # depth map), PNG, WebP (TIFF's is applied by Pillow as it loads).
    if exif_orientation(img) != 1:  # (exif_transpose copies even when upright)
        img = ImageOps.exif_transpose(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode == "F":
        # Float grayscale (a float32 TIFF) is read as the same values given as a pixel array are:
        # [0, 1] (scaled by 255) or [0, 255], and finite. Floats have no bit depth to scale by.
        img = array_to_image(np.asarray(img))
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale by the bit depth to 8 bits (PIL would clip at 255).
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() if arr.size else 0.0
        if depth_scale is not None:  # a TIFF's own depth: 12-bit, signed 16-bit (negatives are black)
            scale = depth_scale
        elif img.mode.startswith("I;16"):
            scale = 255.0 / 65535.0
        else:  # 32-bit int: the depth is not recorded, so infer it from the values
            scale = 1.0 if peak <= 255 else 255.0 / 65535.0 if peak <= 65535 else 255.0 / peak
        img = Image.fromarray(np.clip(np.round(arr * scale), 0, 255).astype(np.uint8))
    return img.convert(color_mode)


def _recorded_depth_scale(img: Image.Image) -> float | None:
    """255 over the largest value an integer grayscale TIFF's samples can hold, from its
    BitsPerSample and SampleFormat tags (TIFF 6.0: 258, 339): a 12-bit scanner or camera file
    (which Pillow opens as 16-bit), a signed 16-bit one (microscopy, elevation: 32767 at most).
    None when the file records no such depth, or 32 bits: Pillow saves every 32-bit integer image
    so, whatever range its values have (8- or 16-bit data kept as int32), so that depth says
    nothing of the scale and the values' range is used."""
    tags = getattr(img, "tag_v2", None)
    if img.mode not in ("I;16", "I;16B", "I;16L", "I") or not tags:
        return None
    bits, sample_format = tags.get(258), tags.get(339, 1)
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    sample_format = sample_format[0] if isinstance(sample_format, tuple) and sample_format else sample_format
    if not isinstance(bits, int) or not 2 <= bits <= 16 or sample_format not in (1, 2):
        return None
    return 255.0 / (2 ** (bits - 1) - 1 if sample_format == 2 else 2**bits - 1)


def resize_square(img: Image.Image, size: int, max_pixels: int | None = None) -> Image.Image:
    """Resize the shorter side to ``size`` and center-crop to ``size`` x ``size``.

    The longer side becomes ``int(size * long / short)`` and the crop starts at half the excess,
    rounded down: the sizes and offsets of transformers' ``shortest_edge`` resize and
    ``center_crop`` (torchvision's ``Resize(size)`` truncates the same way), so that the image
    processor a checkpoint's ``preprocessor_config.json`` describes crops the same pixels.

    With ``max_pixels``, an image whose resized size (before the crop) has more pixels is refused
    before resizing: a tiny, very long image (a 1x20000 PNG is ~100 bytes) would otherwise become
    a ``size`` x ``size * 20000`` one, gigabytes, though its own size passed the pixel limit."""
    width, height = img.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    if max_pixels is not None and new_w * new_h > max_pixels:
        raise ImageError(f"image of {width}x{height} pixels would be resized to {new_w}x{new_h} before the "
                         f"center crop, more than the limit of {max_pixels} pixels (too long and thin) {PIXEL_SETTINGS}")
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def prepare_image(item, data_cfg: DataConfig) -> np.ndarray:
    """Encoded bytes or a pixel array -> uint8 HxWxC of the configured size and color mode.

    An input that cannot become one raises ``ImageError``, whatever failed on it (a decoder's or
    PIL's conversion's own error included, named in the message): training makes it a bad row,
    serving a 400, where any other exception would end the Ray Data task or answer 500.
    MemoryError passes through: the pixel limits (the image's own size, and its size resized)
    refuse an input before it could need that much."""
    try:
        return _prepare_image(item, data_cfg)
    except (ImageError, MemoryError):
        raise
    except Exception as e:  # whatever a decoder or conversion raises on it, the input is to blame
        raise ImageError(f"image could not be prepared: {type(e).__name__}: {e}") from e


def _prepare_image(item, data_cfg: DataConfig) -> np.ndarray:
    # A null cell of a parquet column arrives as None, or as NaN where the whole column is null.
    if item is None or (isinstance(item, float) and np.isnan(item)):
        raise ImageError("no image (empty, or its file is missing or unreadable)")
    if isinstance(item, str):
        shown = item if len(item) <= 60 else item[:57] + "..."
        raise ImageError(f"the image is a string ({shown!r}; a column of file paths?): images are read from encoded "
                         "image bytes or Hugging Face's {bytes, path} structs")
    if isinstance(item, dict):
        raise ImageError(f"the image is a struct of fields {sorted(item)}: images are read from encoded image bytes "
                         "or Hugging Face's {bytes, path} structs (fields bytes and path)")
    if isinstance(item, (bytes, bytearray, memoryview)):
        img = decode_image(bytes(item), data_cfg.max_image_pixels, min_side=data_cfg.image_size)
    elif isinstance(item, Image.Image):
        img = item
    else:
        arr = np.asarray(item)
        if arr.shape[:2] and arr.ndim >= 2 and arr.shape[0] * arr.shape[1] > data_cfg.max_image_pixels:
            raise ImageError(f"pixel array of shape {list(arr.shape)} exceeds {data_cfg.max_image_pixels} pixels")
        img = array_to_image(arr)
    img = resize_square(convert_mode(img, data_cfg.color_mode), data_cfg.image_size, data_cfg.max_image_pixels)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def normalization(data_cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    mean = data_cfg.mean or (IMAGENET_MEAN if data_cfg.color_mode == "RGB" else (float(np.mean(IMAGENET_MEAN)),))
    std = data_cfg.std or (IMAGENET_STD if data_cfg.color_mode == "RGB" else (float(np.mean(IMAGENET_STD)),))
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def hf_image_processor_config(data_cfg: DataConfig) -> dict | None:
    """``prepare_image`` and ``to_model_input`` as a transformers image processor config
    (preprocessor_config.json), so that ``AutoImageProcessor`` and ``pipeline("image-classification")``
    load an RGB checkpoint directory: CLIPImageProcessor's steps are rayfine's (resize the shorter
    side bilinearly, center-crop a square, scale to [0, 1], normalize), with the same sizes and crop
    offsets. Measured: transformers' PIL backend gives rayfine's pixel values exactly for an image
    resized by less than 3x; a larger reduction, which rayfine speeds up with PIL's
    reducing_gap (and, for a JPEG over 6x whose sides the scale divides, by decoding at reduced
    scale), differs by up to ~3 levels, more along the edges where the reduction factor does not
    divide a side (PIL's reduce averages a partial block there: up to 7-14 levels in our checks),
    and the default torchvision backend, with its own resize kernel, by ~1 level otherwise.
    (transformers does not handle alpha and EXIF orientation as ``convert_mode`` does.) None for
    texts, and for grayscale models: transformers' processors convert to RGB or keep the input's mode, never to L."""
    if data_cfg.kind != "image" or data_cfg.color_mode != "RGB":
        return None
    mean, std = normalization(data_cfg)
    size = data_cfg.image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": int(Image.Resampling.BILINEAR),
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        # The float32 values rayfine normalizes with, written as the decimals they came from.
        "image_mean": [float(f"{v:.7g}") for v in mean],
        "image_std": [float(f"{v:.7g}") for v in std],
    }


def to_model_input(images: np.ndarray, data_cfg: DataConfig) -> np.ndarray:
    """uint8 NxHxWxC -> float32 NxCxHxW, normalized, in NCHW strides (as ``to_pixel_values``)."""
    x = images.astype(np.float32) / 255.0
    mean, std = normalization(data_cfg)
    x = (x - mean) / std
    # A copy, not np.ascontiguousarray: a 1-channel NHWC array transposed to NCHW counts as
    # contiguous and keeps its channels-last strides, and from those PyTorch runs every convolution
    # channels-last, converting the weights on each call (grayscale models served 2x slower).
    return x.transpose(0, 3, 1, 2).copy(order="C")


@functools.lru_cache(maxsize=16)
def _normalization_on(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """``normalization`` as 1xCx1x1 tensors on ``device``, made once: a copy from the host to a GPU
    waits for the work the GPU has queued, and a copy in every step would stop the loop from
    queueing the next step's work while the GPU runs this one."""
    import torch

    with torch.inference_mode(False):  # normal tensors, also when first made under validation's inference_mode
        return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in (mean, std))


def _normalization_tensors(data_cfg: DataConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = normalization(data_cfg)
    return _normalization_on(device, tuple(mean.tolist()), tuple(std.tolist()))


def to_pixel_values(images: "torch.Tensor", data_cfg: DataConfig) -> "torch.Tensor":
    """uint8 NxHxWxC -> float32 NxCxHxW, normalized, on the tensor's device: ``to_model_input`` in torch."""
    import torch

    mean, std = _normalization_tensors(data_cfg, images.device)
    x = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)  # the one copy
    return x.div_(255.0).sub_(mean).div_(std)


def augment_batch(x: "torch.Tensor", data_cfg: DataConfig, generator: "torch.Generator") -> "torch.Tensor":
    """Train-time augmentation of model inputs (normalized float NxCxHxW, on any device): random
    shifts of up to 1/8 of the side (the uncovered border black), horizontal flips with
    ``data.hflip``, brightness and contrast jitter. Every random draw comes from ``generator`` (a
    CPU ``torch.Generator``), so the same generator seed gives the same batch."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    mean, std = _normalization_tensors(data_cfg, x.device)
    x = x * std + mean  # back to [0, 1]
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    # The per-image draws reach the device in one copy, from pinned memory on a GPU: a copy from
    # pageable memory waits for the GPU's queued work (see _normalization_on).
    flip = torch.rand(n, generator=generator) < 0.5 if data_cfg.hflip else torch.zeros(n, dtype=torch.bool)
    brightness = torch.empty(n).uniform_(-0.1, 0.1, generator=generator)
    contrast = torch.empty(n).uniform_(0.85, 1.15, generator=generator)
    draws = torch.stack([flip.float(), brightness, contrast])
    if x.device.type == "cuda":
        draws = draws.pin_memory().to(x.device, non_blocking=True)
    flip, brightness, contrast = (d.view(n, 1, 1, 1) for d in draws.to(x.device))
    if data_cfg.hflip:
        out = torch.where(flip.bool(), out.flip(-1), out)
    centre = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - centre) * contrast + centre + brightness).clamp_(0.0, 1.0)
    return (out - mean) / std


def preprocess_for_model(items: list, data_cfg: DataConfig) -> np.ndarray:
    """What serving calls: raw inputs -> the exact float batch the trained model saw at eval time."""
    return to_model_input(np.stack([prepare_image(item, data_cfg) for item in items]), data_cfg)
