"""The HTTP protocol of a served model: request and response models and their validation.

Two APIs answer the same model:
- the Open Inference Protocol (KServe v2) REST API, with JSON tensors or Triton's binary tensor
  data extension (a tensor's bytes after the JSON object, ``Inference-Header-Content-Length``):
  inputs  ``image``  BYTES [N]          image files (base64-encoded in JSON, as they are in binary)
          ``pixels`` UINT8|FP32 [N,H,W] or [N,H,W,C] (C 1, 3 or 4) decoded pixels (image models)
          ``text``   BYTES [N]          UTF-8 texts (text models)
                     BYTES [N,2]        a text and its pair per row (models trained on text pairs)
  outputs ``label`` BYTES [N], ``score`` FP32 [N], ``probabilities`` FP32 [N, num_labels]
  (its ``parameters.labels``, a JSON array in a string, names the columns), or, with an output's
  ``parameters.classification`` K (Triton's classification extension), its top K as BYTES
  [N, min(K, M)] "value:index[:label]";
  errors are ``{"error": "..."}``.
- a simple JSON API: ``{"inputs": [text, [text, pair] or base64 image, ...], "top_k": 5}``
  -> ``{"model_name", "model_version", "predictions": [{"label", "score", "top_k": [...]}]}``.

Nothing here imports torch or Ray: the functions turn a parsed request into the raw items that
``rayfine.data.Preprocessor`` takes (encoded image bytes, pixel arrays, strings), and raise
``RequestError`` (a 4xx with a message naming the problem) for anything else.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import struct
from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from rayfine.config import ServeConfig

DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES")
PIXEL_DATATYPES = ("UINT8", "FP32")
OUTPUTS = ("label", "score", "probabilities")
# The binary tensor data extension: little-endian, row-major; a BYTES element is a 4-byte length
# and its bytes (https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md).
BINARY_HEADER = "Inference-Header-Content-Length"
NUMPY_DTYPES = {"UINT8": "<u1", "FP32": "<f4"}


class RequestError(Exception):
    """A request the server refuses; ``status`` is its 4xx code, the message says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --- Open Inference Protocol (v2) ---------------------------------------------------------------


class _Open(BaseModel):
    # Unknown keys are ignored: the protocol has extensions this server does not use.
    model_config = ConfigDict(extra="ignore")


class RequestInput(_Open):
    name: str = Field(description="image, pixels (image models) or text (text models).")
    # Strict: JSON gives integers; "1", 1.0 or true is a client's mistake, not a dimension.
    shape: list[StrictInt] = Field(description="[N] for BYTES ([N, 2] for a text-pair model's texts); "
                                   "[N, H, W] or [N, H, W, C] for pixels.")
    datatype: Literal[DATATYPES] = Field(description="BYTES, or UINT8 / FP32 for pixels.")  # type: ignore[valid-type]
    parameters: Optional[dict[str, Any]] = Field(
        None, description="binary_data_size: the tensor's bytes follow the JSON object (binary tensor data extension).")
    data: Optional[list[Any]] = Field(None, description="The elements in row-major order, flat or nested "
                                      "(absent when parameters.binary_data_size is given).")


class RequestOutput(_Open):
    name: str = Field(description="label, score or probabilities.")
    parameters: Optional[dict[str, Any]] = Field(
        None, description="binary_data: true sends this output as binary data (binary tensor data extension); "
        "classification: K returns its K highest values as BYTES \"value:index[:label]\" (classification extension).")


class InferenceRequest(_Open):
    id: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    inputs: list[RequestInput]
    outputs: Optional[list[RequestOutput]] = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Optional[dict[str, Any]] = None
    data: Optional[list[Any]] = None  # absent for an output sent as binary data


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    outputs: list[ResponseOutput]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ErrorResponse(BaseModel):
    error: str


# --- the simple JSON API ------------------------------------------------------------------------


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] = Field(description="Texts (text models), [text, pair] lists (models trained on text pairs) "
                              "or base64-encoded image files (image models).")
    top_k: StrictInt = Field(5, ge=1, description="Most probable labels listed per input.")


class LabelScore(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    label: str
    score: float
    top_k: list[LabelScore]


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    predictions: list[Prediction]


# --- parsing ------------------------------------------------------------------------------------


def parse_json(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body; malformed JSON and wrong fields become one readable 400."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise RequestError(describe_validation(e.errors())) from None


def describe_validation(errors: list[dict]) -> str:
    """Pydantic / FastAPI validation errors as one line naming each bad field."""
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") == "json_invalid":
            detail = str(err.get("ctx", {}).get("error") or err.get("msg", ""))
            parts.append(f"malformed JSON body: {detail}")
        elif err.get("type") == "missing":
            parts.append(f"{loc}: required field is missing")
        else:
            parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def model_inputs(kind: str, channels: int, pairs: bool = False) -> list[MetadataTensor]:
    """The v2 input tensors a model of this kind takes (a request sends one of them); ``pairs``:
    a text model trained on text pairs, which takes a text and its pair per row."""
    if kind == "text":
        return [MetadataTensor(name="text", datatype="BYTES", shape=[-1, 2] if pairs else [-1])]
    return [MetadataTensor(name="image", datatype="BYTES", shape=[-1]),
            MetadataTensor(name="pixels", datatype="UINT8", shape=[-1, -1, -1, channels])]


def model_outputs(num_labels: int) -> list[MetadataTensor]:
    return [MetadataTensor(name="label", datatype="BYTES", shape=[-1]),
            MetadataTensor(name="score", datatype="FP32", shape=[-1]),
            MetadataTensor(name="probabilities", datatype="FP32", shape=[-1, num_labels])]


def _check_count(n: int, limits: ServeConfig) -> None:
    if n == 0:
        raise RequestError("no inputs: send at least one item")
    if n > limits.max_items:
        raise RequestError(f"too many items: {n} in one request, the limit is {limits.max_items} (serve.max_items)")


def _leaves(data: list, where: str) -> list:
    """The elements of nested JSON lists, in row-major order."""
    out: list = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                if len(stack) > 8:
                    raise RequestError(f"{where}: data is nested too deeply")
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def _flat_strings(data: list, where: str) -> list[str]:
    out = _leaves(data, where)
    for value in out:
        if not isinstance(value, str):
            raise RequestError(f"{where}: BYTES elements must be JSON strings, got {type(value).__name__}")
    return out


def _check_numbers(data: list, where: str) -> None:
    # numpy would read "5" as 5.0 and true as 1.0: a client's mistake would pass as pixels.
    for value in _leaves(data, where):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(f"{where}: data elements must be JSON numbers, got {type(value).__name__} {value!r:.20}")


_ASCII_SPACE = str.maketrans("", "", " \t\r\n")


def decode_base64(text: str, where: str) -> bytes:
    """Standard padded base64 (a ``data:...;base64,`` prefix is allowed), strictly checked but for
    line breaks and spaces, which base64 tools wrap it with (RFC 2045)."""
    if text.startswith("data:") and ";base64," in text[:200]:
        text = text.split(";base64,", 1)[1]
    try:  # padding is required (RFC 4648 3.2 allows it): unpadded, a truncated text would pass
        data = base64.b64decode(text.translate(_ASCII_SPACE), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: not valid base64 (standard base64, padded with '=' to a multiple of 4 "
                           "characters; image files are sent base64-encoded)") from None
    if not data:
        raise RequestError(f"{where}: empty image")
    return data


def check_image_format(data: bytes, limits: ServeConfig, where: str) -> None:
    """Refuse formats outside serve.image_formats from the header alone (no decoding)."""
    if set(limits.image_formats) >= {"PNG", "JPEG", "MPO", "BMP", "GIF", "TIFF", "WEBP"}:
        return  # every format the preprocessing decodes is allowed: it reports unreadable data itself
    from PIL import Image

    from rayfine.data.images import openable_formats

    try:
        with Image.open(io.BytesIO(data), formats=openable_formats()) as img:
            fmt = img.format
    except Exception:
        return  # not an image at all: the preprocessing says so, in its words
    if fmt not in limits.image_formats:
        raise RequestError(f"{where}: image format {fmt} is not accepted; accepted: {', '.join(limits.image_formats)}",
                           status=415)


def _pixels(inp: RequestInput, raw: Optional[bytes], limits: ServeConfig, where: str) -> list[np.ndarray]:
    shape = inp.shape
    if inp.datatype not in PIXEL_DATATYPES:
        raise RequestError(f"{where}: pixels must be UINT8 (0-255) or FP32 (0-1 or 0-255), got {inp.datatype}")
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3, 4)):
        raise RequestError(f"{where}: shape must be [N, H, W] or [N, H, W, C] with C 1, 3 or 4, got {shape}")
    if min(shape) < 0 or shape[1] < 1 or shape[2] < 1:
        raise RequestError(f"{where}: shape {shape} has an empty or negative dimension")
    _check_count(shape[0], limits)
    if shape[1] * shape[2] > limits.max_image_pixels:
        raise RequestError(f"{where}: images of {shape[2]}x{shape[1]} pixels exceed the limit of "
                           f"{limits.max_image_pixels} (serve.max_image_pixels)")
    if raw is not None:
        itemsize = np.dtype(NUMPY_DTYPES[inp.datatype]).itemsize
        if len(raw) % itemsize:
            raise RequestError(f"{where}: {len(raw)} bytes of binary data are not whole {inp.datatype} elements")
        arr = np.frombuffer(raw, dtype=NUMPY_DTYPES[inp.datatype]).astype(np.float64)
    else:
        _check_numbers(inp.data, where)
        try:
            arr = np.asarray(inp.data, dtype=np.float64)
        except (ValueError, TypeError, OverflowError):  # OverflowError: an integer beyond float64
            raise RequestError(f"{where}: data must be numbers in a regular (not ragged) nesting") from None
    if arr.size != math.prod(shape):
        raise RequestError(f"{where}: shape {shape} needs {math.prod(shape)} elements, data has {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise RequestError(f"{where}: data must be finite numbers")
    if inp.datatype == "UINT8":
        if np.any(arr != np.round(arr)) or arr.min() < 0 or arr.max() > 255:
            raise RequestError(f"{where}: UINT8 data must be integers in [0, 255]")
        arr = arr.astype(np.uint8)
    else:
        if arr.min() < 0 or arr.max() > 255:
            raise RequestError(f"{where}: FP32 pixels must lie in [0, 1] or [0, 255]")
        arr = arr.astype(np.float32)
    return list(arr.reshape(shape))


def split_body(body: bytes, header_length: Optional[str]) -> tuple[bytes, Optional[bytes]]:
    """(JSON object, binary tensor data or None) of a v2 inference body: with the binary tensor data
    extension the first ``Inference-Header-Content-Length`` bytes are the JSON object."""
    if header_length is None:
        return body, None
    try:
        n = int(header_length)
    except ValueError:
        raise RequestError(f"{BINARY_HEADER} is not a number: {header_length[:40]!r}") from None
    if n == 0:  # Triton's raw binary request: the body is one tensor's bytes, no JSON at all
        raise RequestError(f"{BINARY_HEADER} 0 (a raw binary request, without the JSON inference request) is not "
                           f"supported: send the JSON inference request first and its length in {BINARY_HEADER}")
    if not 0 < n <= len(body):
        raise RequestError(f"{BINARY_HEADER} {n} does not fit the body of {len(body)} bytes")
    return body[:n], body[n:]


def _binary_elements(raw: bytes, where: str) -> list[bytes]:
    """BYTES elements in binary: each a 4-byte little-endian length, then that many bytes."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise RequestError(f"{where}: binary BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise RequestError(f"{where}: binary BYTES element {len(out)} claims {n} bytes, {len(raw) - i - 4} remain")
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out


def _binary_data(inp: RequestInput, binary: Optional[bytes], where: str) -> Optional[bytes]:
    """The input's binary tensor data (its parameters.binary_data_size bytes), or None for JSON data."""
    size = (inp.parameters or {}).get("binary_data_size")
    if size is None:
        if binary:
            raise RequestError(f"{len(binary)} bytes follow the JSON object, but {where} has no parameters.binary_data_size")
        if inp.data is None:
            raise RequestError(f"{where}: data is missing (or give parameters.binary_data_size and send the bytes after the JSON)")
        return None
    if inp.data is not None:
        raise RequestError(f"{where}: give data or parameters.binary_data_size, not both")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise RequestError(f"{where}: parameters.binary_data_size must be a whole number of bytes, got {size!r}")
    if binary is None:
        raise RequestError(f"{where}: parameters.binary_data_size needs the {BINARY_HEADER} header (the JSON object's length)")
    if size != len(binary):
        raise RequestError(f"{where}: parameters.binary_data_size is {size}, but {len(binary)} bytes follow the JSON object")
    return binary


def v2_items(req: InferenceRequest, kind: str, limits: ServeConfig, binary: Optional[bytes] = None,
             pairs: bool = False) -> list:
    """The raw items of a v2 request: image bytes, pixel arrays, texts, or [text, pair] lists when
    ``pairs`` (a text model trained on text pairs: BYTES [N, 2], a text and its pair per row).
    ``binary`` is the body after the JSON object when the request uses the binary tensor data extension."""
    if not req.inputs:
        raise RequestError("no inputs: the request needs one input tensor")
    allowed = [t.name for t in model_inputs(kind, 3)]
    if len(req.inputs) != 1:
        raise RequestError(f"send exactly one input tensor (one of: {', '.join(allowed)}), got {len(req.inputs)}")
    inp = req.inputs[0]
    where = f"input {inp.name!r}"
    if inp.name not in allowed:
        raise RequestError(f"unknown input {inp.name!r}; this {kind} model takes one of: {', '.join(allowed)}")
    for out in req.outputs or []:
        if out.name not in OUTPUTS:
            raise RequestError(f"unknown output {out.name!r}; outputs: {', '.join(OUTPUTS)}")
        classification_count(out)  # refused now, before the model runs
    raw = _binary_data(inp, binary, where)
    if inp.name == "pixels":
        return _pixels(inp, raw, limits, where)
    if inp.datatype != "BYTES":
        raise RequestError(f"{where}: datatype must be BYTES, got {inp.datatype}")
    pairs = pairs and kind == "text"
    shape, width = inp.shape, 2 if pairs else 1
    if pairs:
        shape_ok, expected = len(shape) == 2 and shape[1] == 2, "[N, 2] (a text and its pair per row)"
    else:
        shape_ok, expected = len(shape) == 1 or (len(shape) == 2 and shape[1] == 1), "[N] (or [N, 1])"
    if not shape_ok or min(shape) < 0:
        raise RequestError(f"{where}: shape must be {expected}, got {shape}")
    values = _flat_strings(inp.data, where) if raw is None else _binary_elements(raw, where)
    if len(values) != shape[0] * width:
        raise RequestError(f"{where}: shape {shape} needs {shape[0] * width} elements, data has {len(values)}")
    _check_count(shape[0], limits)
    if kind == "text":
        if raw is not None:  # binary elements are the texts' UTF-8, as they are
            values = [_utf8(v, f"{where} element {i}") for i, v in enumerate(values)]
        elif (inp.parameters or {}).get("content_type") == "base64":
            values = [_utf8(decode_base64(v, f"{where} element {i}"), f"{where} element {i}") for i, v in enumerate(values)]
        if pairs:  # row-major: each row is a text and its pair
            values = [values[i:i + 2] for i in range(0, len(values), 2)]
        return _texts(values, limits, where, pairs)
    if raw is not None:  # binary elements are the image files, as they are
        for i, data in enumerate(values):
            _check_raw_image(data, f"{where} element {i}")
            check_image_format(data, limits, f"{where} element {i}")
        return values
    images = [decode_base64(v, f"{where} element {i}") for i, v in enumerate(values)]
    for i, data in enumerate(images):
        check_image_format(data, limits, f"{where} element {i}")
    return images


def _check_raw_image(data: bytes, where: str) -> None:
    if not data:
        raise RequestError(f"{where}: empty image")
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return  # not base64 text: image bytes (or not an image, which the preprocessing reports)
    raise RequestError(f"{where}: this is base64 text; binary tensor data carries the image file's bytes as they are")


def _utf8(data: bytes, where: str, encoding: str = "utf-8") -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        raise RequestError(f"{where}: not UTF-8 text") from None


def _text(text: Any, limits: ServeConfig, where: str) -> str:
    if not isinstance(text, str):
        raise RequestError(f"{where}: expected a string, got {type(text).__name__}")
    if not text.strip():
        raise RequestError(f"{where}: empty text")
    if len(text) > limits.max_text_chars:
        raise RequestError(f"{where}: text of {len(text)} characters exceeds the limit of "
                           f"{limits.max_text_chars} (serve.max_text_chars)")
    return text


def _texts(values: list, limits: ServeConfig, where: str, pairs: bool = False) -> list:
    """Texts, or for a model trained on text pairs [text, pair] lists (what
    ``rayfine.data.text.check_texts`` takes), each text within the serving limits."""
    items: list = []
    for i, value in enumerate(values):
        if pairs:
            if not (isinstance(value, list) and len(value) == 2):
                got = f"a list of {len(value)}" if isinstance(value, list) else f"a {type(value).__name__}"
                raise RequestError(f"{where} {i}: this model takes text pairs, [text, pair]; got {got}")
            items.append([_text(value[0], limits, f"{where} {i} text"), _text(value[1], limits, f"{where} {i} pair")])
        elif isinstance(value, list):
            raise RequestError(f"{where} {i}: this model takes single texts, not lists "
                               "([text, pair] is for models trained on text pairs)")
        else:
            items.append(_text(value, limits, f"{where} {i}"))
    return items


def predict_items(req: PredictRequest, kind: str, limits: ServeConfig, pairs: bool = False) -> list:
    """The raw items of a /predict JSON request; ``pairs``: a text model trained on text pairs,
    whose inputs are [text, pair] lists."""
    _check_count(len(req.inputs), limits)
    if kind == "text":
        return _texts(req.inputs, limits, "input", pairs)
    items = []
    for i, value in enumerate(req.inputs):
        if not isinstance(value, str):
            raise RequestError(f"input {i}: expected a base64-encoded image file (a string), got {type(value).__name__}")
        data = decode_base64(value, f"input {i}")
        check_image_format(data, limits, f"input {i}")
        items.append(data)
    return items


def _file_text(text: str) -> str:
    """An uploaded text file's text without the one line ending that ends its last line."""
    return text.removesuffix("\n").removesuffix("\r")


def upload_items(files: list[tuple[str, bytes]], texts: list[str], kind: str, limits: ServeConfig,
                 pairs: bool = False) -> list:
    """The raw items of a multipart /predict request: uploaded files (images, or UTF-8 texts for
    text models) and, for text models, form fields named ``inputs``. A model trained on text
    pairs takes none: a part carries one text, and pairing parts by their order would be a guess."""
    if kind == "image" and texts:
        raise RequestError("this image model takes uploaded files, not text fields")
    if kind == "text" and pairs:
        raise RequestError('this model takes text pairs: send them as JSON, {"inputs": [[text, pair], ...]} '
                           "(a multipart part carries one text)")
    _check_count(len(files) + len(texts), limits)
    if kind == "text":
        # An uploaded file may start with a byte-order mark (Windows editors write one); it is not
        # text, and the training readers drop it too ("utf-8-sig" decodes either). Nor is the line
        # ending a text file ends with (`echo "great film" > review.txt`): a CSV or JSONL cell has
        # none, and a byte-level BPE tokenizer (RoBERTa, GPT-2) makes a token of it.
        uploaded = [_file_text(_utf8(data, f"file {name!r}", "utf-8-sig")) for name, data in files]
        return _texts(uploaded + texts, limits, "input")
    for name, data in files:
        if not data:
            raise RequestError(f"file {name!r}: empty upload")
        check_image_format(data, limits, f"file {name!r}")
    return [data for _, data in files]


# --- responses ------------------------------------------------------------------------------------


def classification_count(out: RequestOutput) -> int:
    """The output's parameters.classification (Triton's classification extension): how many of its
    highest values to return as "value:index[:label]" strings; 0 (or absent) returns the tensor."""
    count = (out.parameters or {}).get("classification", 0)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise RequestError(f"output {out.name!r}: parameters.classification must be a whole number >= 0, got {count!r}")
    if count and out.name == "label":
        raise RequestError("output 'label': classification needs a numeric output (BYTES has no order); "
                           "ask for it on 'probabilities'")
    return count


def top_indices(row: np.ndarray, k: int) -> np.ndarray:
    """The indices of a row's ``k`` highest values, highest first, ties to the lower index: the one
    ranking of /predict's top_k and the v2 classification extension."""
    return np.argsort(-row, kind="stable")[:k]


def classify(tensor: dict, count: int, labels: Optional[list[str]]) -> dict:
    """A v2 output tensor ([N] or [N, M], batch first) as its ``count`` highest values per item,
    as Triton's classification extension returns them: BYTES [N, min(count, M)] of
    "<value>:<index>[:<label>]", highest first, the value printed as C's %f (std::to_string)."""
    n = tensor["shape"][0]
    rows = np.asarray(tensor["data"], dtype=np.float32).reshape(n, -1)
    k = min(count, rows.shape[1])
    data = []
    for row in rows:
        for i in top_indices(row, k):
            data.append(f"{float(row[i]):f}:{i}" + (f":{labels[i]}" if labels else ""))
    return {"name": tensor["name"], "shape": [n, k], "datatype": "BYTES", "data": data}


def v2_response(name: str, version: str, labels: list[str], probs: np.ndarray, req: InferenceRequest) -> dict:
    """The v2 inference response: the outputs asked for (all by default), each classified when its
    parameters.classification asks (the labels name the columns of 'probabilities' only)."""
    requested = req.outputs or [RequestOutput(name=o) for o in OUTPUTS]
    best = probs.argmax(axis=1)
    n = len(probs)
    tensors = {
        "label": {"name": "label", "shape": [n], "datatype": "BYTES", "data": [labels[i] for i in best]},
        "score": {"name": "score", "shape": [n], "datatype": "FP32", "data": [float(probs[j, i]) for j, i in enumerate(best)]},
        "probabilities": {"name": "probabilities", "shape": [n, len(labels)], "datatype": "FP32",
                          # A parameter is a string, number or boolean (the protocol's $parameter): the
                          # column names go as one JSON array in a string, json.loads(...) reads them.
                          "parameters": {"labels": json.dumps(list(labels), ensure_ascii=False)},
                          "data": [float(x) for x in probs.reshape(-1)]},
    }
    outputs = []
    for o in requested:
        count = classification_count(o)
        tensor = tensors[o.name]
        outputs.append(classify(tensor, count, labels if o.name == "probabilities" else None) if count else tensor)
    out = {"model_name": name, "model_version": version, "outputs": outputs}
    if req.id is not None:
        out["id"] = req.id
    return out


def binary_outputs(req: InferenceRequest) -> set[str]:
    """Outputs the client asked to get as binary data: an output's parameters.binary_data, else the
    request's parameters.binary_data_output (binary tensor data extension; JSON by default)."""
    def flag(parameters: Optional[dict], key: str, default: bool, where: str) -> bool:
        value = (parameters or {}).get(key, default)
        if not isinstance(value, bool):
            raise RequestError(f"{where}parameters.{key} must be true or false, got {value!r}")
        return value

    default = flag(req.parameters, "binary_data_output", False, "")
    if not req.outputs:
        return set(OUTPUTS) if default else set()
    return {o.name for o in req.outputs if flag(o.parameters, "binary_data", default, f"output {o.name!r}: ")}


def to_binary(response: dict, names: set[str]) -> tuple[bytes, bytes]:
    """(JSON object, binary tensor data) of a v2 response whose outputs in ``names`` go as binary
    data, in the order of the outputs; their JSON gives parameters.binary_data_size instead of data."""
    outputs, tail = [], []
    for tensor in response["outputs"]:
        if tensor["name"] in names:
            data = tensor["data"]
            if tensor["datatype"] == "BYTES":
                encoded = [str(x).encode("utf-8") for x in data]
                raw = b"".join(struct.pack("<I", len(e)) + e for e in encoded)
            else:
                raw = np.asarray(data, dtype=NUMPY_DTYPES[tensor["datatype"]]).tobytes()
            tensor = {k: v for k, v in tensor.items() if k != "data"}
            tensor["parameters"] = {**tensor.get("parameters", {}), "binary_data_size": len(raw)}
            tail.append(raw)
        outputs.append(tensor)
    head = json.dumps({**response, "outputs": outputs}, separators=(",", ":")).encode()
    return head, b"".join(tail)


def predict_response(name: str, version: str, labels: list[str], probs: np.ndarray, top_k: int) -> dict:
    k = min(top_k, len(labels))
    predictions = []
    for row in probs:
        order = top_indices(row, k)
        top = [{"label": labels[i], "score": float(row[i])} for i in order]
        predictions.append({"label": top[0]["label"], "score": top[0]["score"], "top_k": top})
    return {"model_name": name, "model_version": version, "predictions": predictions}
