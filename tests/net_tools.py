"""Small helpers the HTTP tests share: a free loopback port, images as encoded files, base64."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from rayfine.runtime import free_port  # noqa: F401  (the tests' free loopback port)


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    """``arr`` encoded as an image file (PNG unless ``fmt`` says otherwise)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
