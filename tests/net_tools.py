"""Small helpers the HTTP tests share: a free loopback port, images as encoded files, base64."""

from __future__ import annotations

import base64
import io
import socket

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    """``arr`` encoded as an image file (PNG unless ``fmt`` says otherwise)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
