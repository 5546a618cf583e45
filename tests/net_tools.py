"""Small helpers the HTTP tests share: a free loopback port, images as encoded files, base64, waiting
for a condition, a Serve app's running replicas, served answers checked against their checkpoint."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rayfine.runtime import free_port  # noqa: F401  (the tests' free loopback port)


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    """``arr`` encoded as an image file (PNG unless ``fmt`` says otherwise)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb); its pixel
    data is 64 bytes, so decoding it fails: a refusal that names the size came from the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def bomb_gif(width: int, height: int) -> bytes:
    """A GIF header that claims width x height pixels (at most 65535 each), then garbage."""
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + png(np.zeros((8, 8), np.uint8), "GIF")[13:40] + b"\xff" * 50


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wait_for(predicate, timeout_s: float, poll_s: float = 0.1, what: str = "a condition"):
    """``predicate()``'s first truthy value, polled every ``poll_s``; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def running_replicas(app: str) -> int:
    """RUNNING replicas of the app's Classifier deployment (0 while the app itself is not RUNNING)."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or status.status != "RUNNING":
        return 0
    return status.deployments["Classifier"].replica_states.get("RUNNING", 0)


def check_served_as_checkpoint(served: list[dict], checkpoint_dir: Path, files: list[bytes]) -> None:
    """Each served prediction (``{"label", "score", ...}``, one per file) is what the checkpoint
    itself answers for the same file in this process: the same label, the same score to 1e-5."""
    from rayfine.checkpoints import load_checkpoint
    from rayfine.data import Preprocessor

    ckpt = load_checkpoint(checkpoint_dir)
    probs = ckpt.predict_proba(Preprocessor(ckpt.cfg, str(checkpoint_dir))(files)).numpy()
    assert len(served) == len(files) == len(probs)
    for answer, p in zip(served, probs):
        assert answer["label"] == ckpt.labels[int(p.argmax())], (answer, p)
        assert answer["score"] == pytest.approx(float(p.max()), abs=1e-5)
