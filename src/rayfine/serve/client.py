"""A small client of the served API: what `rayfine predict` runs.

    from rayfine.serve.client import predict
    result = predict("http://127.0.0.1:8000", ["cat.png", "dog.jpg"])      # files: uploaded
    result = predict("http://127.0.0.1:8000", ["a fine film", "dull"])    # texts: JSON

Files go as a multipart upload to POST /predict, texts as JSON. Inference changes nothing on the
server, so a call that fails to connect, loses its connection before an answer, or gets a 5xx
(Serve answers 500/503 for a request whose replica died or is overloaded) is retried once; a 4xx
is the request's own fault and is not retried: its JSON ``error`` is raised as ``ClientError``.
Imports only ``requests`` (no Ray, no torch): the CLI stays fast.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Any, Optional

from rayfine.errors import RayfineError

API_KEY_ENV = "RAYFINE_API_KEY"


class ClientError(RayfineError):
    """The server refused the request (its reason) or could not be reached."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


def _headers(api_key: Optional[str]) -> dict[str, str]:
    if not api_key:
        return {}
    if any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in api_key):
        # requests would refuse the header with its value in the message, and the CLI would print it.
        raise ClientError("the API key holds a newline or another control character, which an HTTP header cannot "
                          f"carry; check {API_KEY_ENV} or --api-key-file")
    return {"Authorization": f"Bearer {api_key}"}


RETRIED_STATUS = (500, 502, 503, 504)
RETRY_DELAY_S = 0.25


def call(method: str, url: str, *, retries: int = 1, timeout_s: float = 60, **kwargs) -> Any:
    """One idempotent HTTP call with ``retries`` retries on connection errors and 5xx; JSON back."""
    import time

    import requests

    if not url.startswith(("http://", "https://")):
        raise ClientError(f"{url.split('/')[0]}: give the server's URL with its scheme, e.g. http://{url.split('/')[0]}")
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(RETRY_DELAY_S)
        try:
            response = requests.request(method, url, timeout=timeout_s, **kwargs)
        except (requests.exceptions.InvalidHeader, UnicodeEncodeError):
            # Both are built from the header's value, which may be the API key: never show it.
            raise ClientError("a request header cannot be sent as HTTP (a control character, or a character "
                              "outside Latin-1, in the API key?)") from None
        except (requests.ConnectionError, requests.Timeout) as e:  # ConnectTimeout is both
            if attempt < retries:
                continue
            if isinstance(e, requests.ConnectionError):
                raise ClientError(f"cannot reach {url} ({type(e).__name__}; tried {retries + 1} times)") from None
            raise ClientError(f"no answer from {url} within {timeout_s:g} s (tried {retries + 1} times)") from None
        if response.status_code not in RETRIED_STATUS:
            break
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        reason = body.get("error") if isinstance(body, dict) else None
        raise ClientError(f"{response.status_code} from {url}: {reason or response.text[:200]}", response.status_code)
    if body is None:
        raise ClientError(f"{url} answered {response.status_code} without JSON")
    return body


def _is_file(x: str) -> bool:
    """Whether ``x`` names an existing file; a text too long or odd for a path is not one."""
    try:
        return Path(x).is_file()
    except (OSError, ValueError):  # ENAMETOOLONG; an embedded NUL
        return False


# What an input that names no existing file, yet looks like a file's name, ends in: the image
# files rayfine reads (rayfine.data.images.IMAGE_EXTENSIONS, named here too: importing it would
# start Ray's import in this light client), MPO (a JPEG with more frames) and text files.
FILE_SUFFIXES = tuple(f".{e}" for e in ("png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp", "jfif", "jpe",
                                        "mpo", "txt"))


def _looks_like_a_file(x: str) -> bool:
    """One word ending in an image or text file's suffix (photo.png, scans/x.JPG), which no text is."""
    return not any(c.isspace() for c in x) and x.lower().endswith(FILE_SUFFIXES)


def predict(url: str, inputs: list[str], *, api_key: Optional[str] = None, top_k: int = 5,
            timeout_s: float = 60, retries: int = 1, pairs: bool = False, texts: bool = False) -> dict:
    """POST /predict: ``inputs`` are all existing files (uploaded) or all texts; with ``texts``,
    texts whatever they look like (a text that names a file); with ``pairs``, texts taken two at a
    time, a text and its pair (for a model trained on text pairs)."""
    if not inputs:
        raise ClientError("give at least one input (files or texts)")
    # Stripped as the server strips its key (a Kubernetes Secret made by `echo key > file` ends in a newline).
    api_key = (api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")).strip() or None
    endpoint = url.rstrip("/") + "/predict"
    if pairs:
        if len(inputs) % 2:
            raise ClientError(f"--pairs takes texts two at a time, a text and its pair; got {len(inputs)} texts")
        return call("POST", endpoint, json={"inputs": text_pairs(inputs), "top_k": top_k},
                    headers=_headers(api_key), timeout_s=timeout_s, retries=retries)
    files = [] if texts else [Path(x) for x in inputs if _is_file(x)]
    if files and len(files) != len(inputs):
        missing = [x for x in inputs if not _is_file(x)]
        raise ClientError(f"give either files or texts, not both; not files: {missing[:3]}")
    if not files and not texts and (named := [x for x in inputs if _looks_like_a_file(x)]):
        # Else a mistyped photo.png would go to the model as the text "photo.png".
        raise ClientError(f"no such file: {named[0]} (texts are sent as they are, files uploaded; "
                          f"this looks like a file name: --texts sends it as a text)")
    if files:
        parts = [("files", (f.name, f.read_bytes())) for f in files]
        return call("POST", endpoint, params={"top_k": top_k}, files=parts, headers=_headers(api_key),
                    timeout_s=timeout_s, retries=retries)
    return call("POST", endpoint, json={"inputs": list(inputs), "top_k": top_k}, headers=_headers(api_key),
                timeout_s=timeout_s, retries=retries)


def text_pairs(texts: list[str]) -> list[list[str]]:
    """[a, b, c, d] -> [[a, b], [c, d]]: the /predict inputs of a model trained on text pairs."""
    return [list(texts[i:i + 2]) for i in range(0, len(texts), 2)]


def format_predictions(inputs: list[str], result: dict, pairs: bool = False, texts: bool = False) -> str:
    """One tab-separated line per input (a file by its name, a text or a text pair by its start;
    with ``texts`` or ``pairs`` every input is a text, as ``predict`` sent it):
    label, score, runners-up. Control characters are shown escaped (``\\n``, ``\\t``), so that
    a text with a newline or a tab is still one line of four fields."""
    lines = [f"# model {result.get('model_name')} version {result.get('model_version')}"]
    shown_inputs = [" | ".join(pair) for pair in text_pairs(inputs)] if pairs else inputs
    for item, p in zip(shown_inputs, result["predictions"]):
        shown = _escaped(Path(item).name if not (pairs or texts) and _is_file(item) else item)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        others = ", ".join(f"{_escaped(t['label'])} {t['score']:.3f}" for t in p["top_k"][1:])
        lines.append(f"{shown}\t{_escaped(p['label'])}\t{p['score']:.4f}" + (f"\t({others})" if others else ""))
    return "\n".join(lines)


def _escaped(text: str) -> str:
    """``text`` with the characters a terminal would not show as themselves escaped as ``repr``
    does (a newline as \\n, a tab as \\t, an ESC as \\x1b); letters of any script and spaces stay."""
    return "".join(c if c.isprintable() or unicodedata.category(c) == "Zs" else repr(c)[1:-1] for c in str(text))
