"""Serving without Ray (unit tier): request parsing and limits, deployment options, build_app
args, the API key source, and the `rayfine predict` client (its retry, on a real local socket)."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
from net_tools import b64, bomb_gif, png

from rayfine.config import SERVE_IMAGE_FORMATS, ConfigError, ServeConfig, load_config
from rayfine.data.images import ACCEPTED_FORMATS
from rayfine.serve import protocol
from rayfine.serve.protocol import InferenceRequest, PredictRequest, RequestError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic warnings

LIMITS = ServeConfig(max_items=4, max_batch_size=8, max_image_pixels=10_000, max_text_chars=20,
                     image_formats=("PNG", "JPEG"))


def v2(inputs, **extra) -> InferenceRequest:
    return InferenceRequest.model_validate({"inputs": inputs, **extra})


def test_serve_formats_are_the_decodable_ones():
    assert set(SERVE_IMAGE_FORMATS) == set(ACCEPTED_FORMATS)


def test_v2_bytes_pixels_and_texts_become_raw_items():
    img = png(np.arange(64, dtype=np.uint8).reshape(8, 8))
    items = protocol.v2_items(v2([{"name": "image", "shape": [2], "datatype": "BYTES", "data": [b64(img), b64(img)]}]),
                              "image", LIMITS)
    assert items == [img, img]
    # Nested and flat data are the same tensor (row-major).
    flat = list(range(2 * 3 * 3))
    nested = np.arange(18).reshape(2, 3, 3).tolist()
    a = protocol.v2_items(v2([{"name": "pixels", "shape": [2, 3, 3], "datatype": "UINT8", "data": flat}]), "image", LIMITS)
    b = protocol.v2_items(v2([{"name": "pixels", "shape": [2, 3, 3], "datatype": "UINT8", "data": nested}]), "image", LIMITS)
    assert len(a) == 2 and all(x.dtype == np.uint8 and x.shape == (3, 3) for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    floats = protocol.v2_items(v2([{"name": "pixels", "shape": [1, 2, 2, 3], "datatype": "FP32", "data": [0.5] * 12}]),
                               "image", LIMITS)
    assert floats[0].shape == (2, 2, 3) and floats[0].dtype == np.float32
    texts = protocol.v2_items(v2([{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [["good"], ["bad"]]}]),
                              "text", LIMITS)
    assert texts == ["good", "bad"]
    encoded = protocol.v2_items(v2([{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"},
                                     "data": [b64("héllo".encode())]}]), "text", LIMITS)
    assert encoded == ["héllo"]


@pytest.mark.parametrize("inputs,kind,status,message", [
    ([], "image", 400, "no inputs"),
    ([{"name": "image", "shape": [0], "datatype": "BYTES", "data": []}], "image", 400, "no inputs"),
    ([{"name": "image", "shape": [5], "datatype": "BYTES", "data": ["x"] * 5}], "image", 400, "too many items: 5"),
    ([{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}], "image", 400, "needs 2 elements"),
    ([{"name": "image", "shape": [1], "datatype": "BYTES", "data": [3]}], "image", 400, "must be JSON strings"),
    ([{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}], "image", 400, "not valid base64"),
    ([{"name": "image", "shape": [1], "datatype": "UINT8", "data": [1]}], "image", 400, "datatype must be BYTES"),
    ([{"name": "image", "shape": [1, 2], "datatype": "BYTES", "data": ["a", "b"]}], "image", 400, "shape must be [N]"),
    ([{"name": "pixels", "shape": [1, 3, 3], "datatype": "INT64", "data": [0] * 9}], "image", 400, "UINT8 (0-255) or FP32"),
    ([{"name": "pixels", "shape": [1, 3, 3], "datatype": "UINT8", "data": [0] * 8}], "image", 400, "needs 9 elements"),
    ([{"name": "pixels", "shape": [1, 3, 3, 2], "datatype": "UINT8", "data": [0] * 18}], "image", 400, "C 1, 3 or 4"),
    ([{"name": "pixels", "shape": [1, 3], "datatype": "UINT8", "data": [0] * 3}], "image", 400, "[N, H, W]"),
    ([{"name": "pixels", "shape": [1, 3, 3], "datatype": "UINT8", "data": [300] * 9}], "image", 400, "integers in [0, 255]"),
    ([{"name": "pixels", "shape": [1, 3, 3], "datatype": "UINT8", "data": [[1, 2, 3], [4, 5], [6]]}], "image", 400, "ragged"),
    ([{"name": "pixels", "shape": [1, 1, 1], "datatype": "UINT8", "data": [10 ** 400]}], "image", 400, "must be numbers"),
    ([{"name": "pixels", "shape": [1, 200, 200], "datatype": "UINT8", "data": [0]}], "image", 400, "exceed the limit of 10000"),
    ([{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}], "image", 400, "unknown input 'text'"),
    ([{"name": "pixels", "shape": [1, 3, 3], "datatype": "UINT8", "data": [0] * 9}], "text", 400, "unknown input 'pixels'"),
    ([{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x" * 21]}], "text", 400, "exceeds the limit of 20"),
    ([{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["  "]}], "text", 400, "empty text"),
    ([{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}], "text", 400, "datatype must be BYTES"),
    ([{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}] * 2, "text", 400, "exactly one input tensor"),
    ([{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"], "parameters": {"binary_data_size": 1}}], "text", 400,
     "give data or parameters.binary_data_size, not both"),
    ([{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}], "text", 400,
     "needs the Inference-Header-Content-Length header"),
    ([{"name": "text", "shape": [1], "datatype": "BYTES"}], "text", 400, "data is missing"),
])
def test_bad_v2_tensors_are_refused_with_the_reason(inputs, kind, status, message):
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as e:
        protocol.v2_items(v2(inputs), kind, LIMITS)
    assert e.value.status == status


def test_unknown_output_and_datatype_and_malformed_json():
    with pytest.raises(RequestError, match="unknown output 'logits'"):
        protocol.v2_items(v2([{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}], outputs=[{"name": "logits"}]),
                          "text", LIMITS)
    with pytest.raises(RequestError, match="inputs.0.datatype"):
        protocol.parse_json(InferenceRequest, b'{"inputs": [{"name": "text", "shape": [1], "datatype": "STRING", "data": ["a"]}]}')
    with pytest.raises(RequestError, match="malformed JSON body"):
        protocol.parse_json(InferenceRequest, b'{"inputs": [')
    with pytest.raises(RequestError, match="inputs: required field is missing"):
        protocol.parse_json(InferenceRequest, b'{"id": "1"}')


def triton_body(inputs, outputs=None, **kw) -> tuple[bytes, str]:
    """A v2 request body exactly as tritonclient (Triton's HTTP client) builds it, and its
    Inference-Header-Content-Length (None when it sent no binary data)."""
    from tritonclient.http import InferenceServerClient

    body, json_size = InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kw)
    return (body if isinstance(body, bytes) else body.encode()), (None if json_size is None else str(json_size))


def triton_items(kind: str, inputs, outputs=None, limits=LIMITS, **kw) -> list:
    """What the server makes of tritonclient's request (api.infer's steps, without HTTP)."""
    body, header = triton_body(inputs, outputs, **kw)
    head, binary = protocol.split_body(body, header)
    return protocol.v2_items(protocol.parse_json(InferenceRequest, head), kind, limits, binary)


def with_size(req: InferenceRequest, size: int) -> InferenceRequest:
    """``req`` with its input's parameters.binary_data_size set to ``size``."""
    sized = req.inputs[0].model_copy(update={"parameters": {"binary_data_size": size}})
    return req.model_copy(update={"inputs": [sized]})


def test_binary_tensor_data_from_tritonclient_becomes_the_same_items():
    import tritonclient.http as tc

    img = png(np.arange(64, dtype=np.uint8).reshape(8, 8))
    gif = png(np.zeros((8, 8), np.uint8), "GIF")  # starts with "GIF89a", base64's alphabet
    images = tc.InferInput("image", [2], "BYTES")
    images.set_data_from_numpy(np.array([img, gif], dtype=np.object_), binary_data=True)
    assert triton_items("image", [images], limits=LIMITS.model_copy(update={"image_formats": ("PNG", "GIF")})) == [img, gif]
    pixels = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
    for dtype, datatype in ((np.uint8, "UINT8"), (np.float32, "FP32")):
        t = tc.InferInput("pixels", [2, 3, 3], datatype)
        t.set_data_from_numpy(pixels.astype(dtype), binary_data=True)
        items = triton_items("image", [t])
        assert len(items) == 2 and all(x.dtype == dtype and np.array_equal(x, p) for x, p in zip(items, pixels))
    texts = tc.InferInput("text", [2], "BYTES")
    texts.set_data_from_numpy(np.array(["a fine film", "héllo"], dtype=np.object_), binary_data=True)
    assert triton_items("text", [texts]) == ["a fine film", "héllo"]
    # tritonclient's JSON requests are the protocol's JSON (no Inference-Header-Content-Length).
    texts.set_data_from_numpy(np.array(["a fine film", "dull"], dtype=np.object_), binary_data=False)
    _, header = triton_body([texts])
    assert header is None and triton_items("text", [texts]) == ["a fine film", "dull"]


def test_bad_binary_tensor_data_is_refused_with_the_reason():
    import tritonclient.http as tc

    img = png(np.zeros((8, 8), np.uint8))
    t = tc.InferInput("image", [1], "BYTES")
    t.set_data_from_numpy(np.array([b64(img).encode()], dtype=np.object_), binary_data=True)
    with pytest.raises(RequestError, match="this is base64 text"):
        triton_items("image", [t])
    t.set_data_from_numpy(np.array([img], dtype=np.object_), binary_data=True)
    body, header = triton_body([t])
    head = body[:int(header)]
    req = protocol.parse_json(InferenceRequest, head)
    for binary, message in [
        (body[int(header):-1], "binary_data_size is .*, but .* bytes follow"),
        (body[int(header):int(header) + 2], "binary_data_size is"),
    ]:
        with pytest.raises(RequestError, match=message):
            protocol.v2_items(req, "image", LIMITS, binary)
    # BYTES elements cut short: in an element, and in its 4-byte length.
    for cut, message in [(body[int(header):-3], "element 0 claims .* bytes"), (body[int(header):int(header) + 2], "4-byte length")]:
        with pytest.raises(RequestError, match=message):
            protocol.v2_items(with_size(req, len(cut)), "image", LIMITS, cut)
    for header_value, message in [("x", "is not a number"), ("-1", "does not fit"), (str(len(body) + 1), "does not fit"),
                                  ("0", r"0 \(a raw binary request, without the JSON inference request\) is not supported")]:
        with pytest.raises(RequestError, match=message):
            protocol.split_body(body, header_value)
    plain = v2([{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(img)]}])
    with pytest.raises(RequestError, match="no parameters.binary_data_size"):
        protocol.v2_items(plain, "image", LIMITS, b"\x00\x01")
    pixels = tc.InferInput("pixels", [1, 3, 3], "FP32")
    pixels.set_data_from_numpy(np.zeros((1, 3, 3), np.float32), binary_data=True)
    body, header = triton_body([pixels])
    cut = body[int(header):-1]
    with pytest.raises(RequestError, match="35 bytes of binary data are not whole FP32 elements"):
        protocol.v2_items(with_size(protocol.parse_json(InferenceRequest, body[:int(header)]), len(cut)), "image", LIMITS, cut)
    with pytest.raises(RequestError, match="'label': classification needs a numeric output"):
        triton_items("image", [pixels], outputs=[tc.InferRequestedOutput("label", class_count=3)])
    for count in (-1, 2.5, "3", True):
        bad = v2([{"name": "pixels", "shape": [1, 3, 3], "datatype": "UINT8", "data": [0] * 9}],
                 outputs=[{"name": "score", "parameters": {"classification": count}}])
        with pytest.raises(RequestError, match="'score': parameters.classification must be a whole number >= 0"):
            protocol.v2_items(bad, "image", LIMITS)


def test_line_wrapped_base64_is_read_and_other_garbage_is_not():
    """base64 as tools print it (Python's encodebytes, coreutils base64 without -w0, openssl base64:
    lines of 76 or 64 characters, LF or CRLF) is the same image; other characters, or missing
    padding, are refused."""
    img = png(np.arange(64, dtype=np.uint8).reshape(8, 8))
    one_line = b64(img)
    wrapped = base64.encodebytes(img).decode()
    assert "\n" in wrapped.strip()  # several lines
    for text in (wrapped, wrapped.replace("\n", "\r\n"), "\n".join(one_line[i:i + 64] for i in range(0, len(one_line), 64)),
                 " " + one_line + "\t\n", "data:image/png;base64," + wrapped):
        assert protocol.decode_base64(text, "input 0") == img
    assert protocol.predict_items(PredictRequest(inputs=[wrapped]), "image", LIMITS) == [img]
    assert protocol.v2_items(v2([{"name": "image", "shape": [1], "datatype": "BYTES", "data": [wrapped]}]), "image",
                             LIMITS) == [img]
    assert protocol.decode_base64("aGk=\n", "input 0") == b"hi"
    for text in ("aGk", "aGk\n", "aG-=", "aGk=\v", "aGk=\u00a0", one_line[:40] + "%" + one_line[41:]):  # unpadded, base64url, ...
        with pytest.raises(RequestError, match="not valid base64 .*padded with '='"):
            protocol.decode_base64(text, "input 0")


def test_image_format_limit_reads_only_the_header():
    gif = png(np.zeros((8, 8), np.uint8), "GIF")
    with pytest.raises(RequestError, match="image format GIF is not accepted; accepted: PNG, JPEG") as e:
        protocol.predict_items(PredictRequest(inputs=[b64(gif)]), "image", LIMITS)
    assert e.value.status == 415
    # A GIF header over garbage (claiming 3000x3000): refused by its format from the header alone.
    with pytest.raises(RequestError, match="image format GIF is not accepted") as e:
        protocol.predict_items(PredictRequest(inputs=[b64(bomb_gif(3000, 3000))]), "image", LIMITS)
    assert e.value.status == 415
    ok = protocol.predict_items(PredictRequest(inputs=[b64(png(np.zeros((8, 8), np.uint8), "JPEG"))]), "image", LIMITS)
    assert len(ok) == 1
    # Not an image at all: left to the preprocessing, which names the problem.
    assert protocol.predict_items(PredictRequest(inputs=[b64(b"not an image")]), "image", LIMITS) == [b"not an image"]


def test_predict_and_upload_items():
    img = png(np.zeros((8, 8), np.uint8))
    assert protocol.predict_items(PredictRequest(inputs=["data:image/png;base64," + b64(img)]), "image", LIMITS) == [img]
    with pytest.raises(RequestError, match="expected a base64-encoded image file"):
        protocol.predict_items(PredictRequest(inputs=[[1, 2]]), "image", LIMITS)
    with pytest.raises(RequestError, match="no inputs"):
        protocol.predict_items(PredictRequest(inputs=[]), "text", LIMITS)
    assert protocol.upload_items([("a.txt", "fine".encode())], ["dull"], "text", LIMITS) == ["fine", "dull"]
    # A file saved with a byte-order mark: the mark is not part of the text (only a file's first).
    assert protocol.upload_items([("w.txt", "\ufefffine \ufeff".encode())], [], "text", LIMITS) == ["fine \ufeff"]
    # Nor is the line ending that ends a text file's last line (`echo "great film" > review.txt`); a
    # second one, or one in a form field, is the sender's.
    files = [("a.txt", b"great film\n"), ("w.txt", b"great film\r\n"), ("b.txt", b"two\n\n")]
    assert protocol.upload_items(files, ["field\n"], "text", LIMITS) == ["great film", "great film", "two\n", "field\n"]
    assert protocol.upload_items([("c.txt", b"a\nb")], [], "text", LIMITS) == ["a\nb"]
    with pytest.raises(RequestError, match="not UTF-8"):
        protocol.upload_items([("a.bin", b"\xff\xfe\xfa")], [], "text", LIMITS)
    with pytest.raises(RequestError, match="takes uploaded files, not text fields"):
        protocol.upload_items([], ["x"], "image", LIMITS)


def test_responses_follow_the_protocol():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], np.float32)
    req = v2([{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}], id="42")
    out = protocol.v2_response("m", "v1", ["neg", "pos", "mid"], probs, req)
    assert out["id"] == "42" and out["model_name"] == "m" and out["model_version"] == "v1"
    tensors = {o["name"]: o for o in out["outputs"]}
    assert tensors["label"] == {"name": "label", "shape": [2], "datatype": "BYTES", "data": ["pos", "neg"]}
    assert tensors["probabilities"]["shape"] == [2, 3]
    # The protocol's $parameter is a string, number or boolean: the column names are one JSON string.
    assert tensors["probabilities"]["parameters"] == {"labels": '["neg", "pos", "mid"]'}
    assert np.allclose(np.reshape(tensors["probabilities"]["data"], (2, 3)), probs)
    only = protocol.v2_response("m", "v1", ["neg", "pos", "mid"], probs, v2(req.model_dump()["inputs"], outputs=[{"name": "score"}]))
    assert [o["name"] for o in only["outputs"]] == ["score"] and "id" not in only
    simple = protocol.predict_response("m", "v1", ["neg", "pos", "mid"], probs, top_k=2)
    assert protocol.binary_outputs(req) == set()
    for bad in (v2(req.model_dump()["inputs"], parameters={"binary_data_output": "yes"}),
                v2(req.model_dump()["inputs"], outputs=[{"name": "label", "parameters": {"binary_data": 1}}])):
        with pytest.raises(RequestError, match="binary_data(_output)? must be true or false"):
            protocol.binary_outputs(bad)
    assert simple["predictions"][0]["label"] == "pos"
    assert [t["label"] for t in simple["predictions"][1]["top_k"]] == ["neg", "pos"]


def test_binary_responses_read_back_with_tritonclient():
    """Outputs asked for as binary data come after the JSON object, and Triton's own client reads them."""
    import tritonclient.http as tc

    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], np.float32)
    labels = ["neg", "pos", "héllo"]
    texts = tc.InferInput("text", [2], "BYTES")
    texts.set_data_from_numpy(np.array(["a", "b"], dtype=np.object_))
    for outputs, names, binary in [
        (None, list(protocol.OUTPUTS), set(protocol.OUTPUTS)),  # tritonclient's default: every output as binary data
        ([tc.InferRequestedOutput("label", binary_data=False), tc.InferRequestedOutput("probabilities")],
         ["label", "probabilities"], {"probabilities"}),
        ([tc.InferRequestedOutput("score", binary_data=False)], ["score"], set()),
    ]:
        body, header = triton_body([texts], outputs, request_id="9")
        req = protocol.parse_json(InferenceRequest, body[:int(header)] if header else body)
        assert protocol.binary_outputs(req) == binary
        response = protocol.v2_response("m", "v1", labels, probs, req)
        head, tail = protocol.to_binary(response, binary)
        result = tc.InferResult.from_response_body(head + tail, header_length=len(head) if binary else None)
        outputs_back = result.get_response()["outputs"]
        assert [o["name"] for o in outputs_back] == names
        assert {o["name"] for o in outputs_back if "data" not in o} == binary  # binary ones carry no JSON data
        assert result.get_response()["id"] == "9" and result.get_response()["model_version"] == "v1"
        if "label" in names:
            assert [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")] == ["pos", "neg"]
        if "score" in names:
            assert np.allclose(result.as_numpy("score"), [0.7, 0.5])
        if "probabilities" in names:
            got = result.as_numpy("probabilities")
            assert got.shape == (2, 3) and got.dtype == np.float32 and np.array_equal(got, probs)
            assert json.loads(result.get_output("probabilities")["parameters"]["labels"]) == labels


def test_classification_extension_as_triton_returns_it():
    """parameters.classification K (tritonclient's class_count) turns an output into its K highest
    values per item, BYTES [N, min(K, M)] of "value:index[:label]" (std::to_string's %f), highest
    first, whether the answer travels as JSON or as binary data; 0 leaves the tensor as it is."""
    import tritonclient.http as tc

    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], np.float32)
    labels = ["neg", "pos", "mid:dle"]
    texts = tc.InferInput("text", [2], "BYTES")
    texts.set_data_from_numpy(np.array(["a", "b"], dtype=np.object_), binary_data=False)
    for binary in (False, True):
        outputs = [tc.InferRequestedOutput("probabilities", binary_data=binary, class_count=2),
                   tc.InferRequestedOutput("score", binary_data=binary, class_count=5),
                   tc.InferRequestedOutput("label", binary_data=binary, class_count=0)]
        body, header = triton_body([texts], outputs)
        req = protocol.parse_json(InferenceRequest, body[:int(header)] if header else body)
        assert len(protocol.v2_items(req, "text", LIMITS)) == 2
        names = protocol.binary_outputs(req)
        head, tail = protocol.to_binary(protocol.v2_response("m", "v1", labels, probs, req), names)
        result = tc.InferResult.from_response_body(head + tail, header_length=len(head) if names else None)
        def strings(name):  # tritonclient gives str for JSON BYTES and bytes for binary ones
            values = result.as_numpy(name)
            return values.shape, [x.decode() if isinstance(x, bytes) else x for x in values.reshape(-1)]

        assert result.get_output("probabilities")["datatype"] == "BYTES"
        assert strings("probabilities") == ((2, 2), ["0.700000:1:pos", "0.200000:2:mid:dle", "0.500000:0:neg", "0.300000:1:pos"])
        assert strings("score") == ((2, 1), ["0.700000:0", "0.500000:0"])  # one value per item: index 0, no label
        assert strings("label") == ((2,), ["pos", "neg"])
    # Ties keep the lower index first; a count above the classes gives them all.
    tied = protocol.v2_response("m", "v1", ["a", "b"], np.array([[0.5, 0.5]], np.float32),
                                v2([{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
                                   outputs=[{"name": "probabilities", "parameters": {"classification": 9}}]))
    assert tied["outputs"] == [{"name": "probabilities", "shape": [1, 2], "datatype": "BYTES",
                                "data": ["0.500000:0:a", "0.500000:1:b"]}]


def test_compressed_bodies_are_decoded_as_they_arrive_and_within_the_limit():
    """Content-Encoding gzip and deflate (zlib's format, or raw deflate as some clients send it),
    fed whole or a byte at a time; a bomb stops at the limit, broken data is a 400."""
    import gzip
    import zlib

    from rayfine.serve.api import BadBody, BodyDecoder, BodyTooLarge

    body = b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a fine film"]}]}' * 20
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    encoded = [("gzip", gzip.compress(body)), ("x-gzip", gzip.compress(body)), ("deflate", zlib.compress(body)),
               ("deflate", raw.compress(body) + raw.flush())]
    for coding, data in encoded:
        assert BodyDecoder(coding, len(body)).feed(data, last=True) == body
        decoder = BodyDecoder(coding, len(body))
        assert b"".join(decoder.feed(data[i:i + 1], last=i == len(data) - 1) for i in range(len(data))) == body
        with pytest.raises(BodyTooLarge, match=f"decompressed request body exceeds the limit of {len(body) - 1} bytes"):
            BodyDecoder(coding, len(body) - 1).feed(data, last=True)
        with pytest.raises(BadBody, match=f"the body ends before its {coding} data does"):
            BodyDecoder(coding, len(body)).feed(data[:-8], last=True)
        if "gzip" not in coding:  # a deflate body is one stream (gzip's several members: the next test)
            with pytest.raises(BadBody, match=f"data after the end of its {coding} stream"):
                BodyDecoder(coding, 10 * len(body)).feed(data + data, last=True)
    with pytest.raises(BodyTooLarge):  # 100 MB of spaces in ~100 KB: stopped at the limit, never inflated
        BodyDecoder("gzip", 1 << 20).feed(gzip.compress(b" " * 100_000_000), last=True)
    for coding, data in [("gzip", b"not gzip at all"), ("deflate", b"\x78\x9c not deflate")]:
        with pytest.raises(BadBody, match=f"not valid {coding} data"):
            BodyDecoder(coding, 1000).feed(data, last=True)
    with pytest.raises(BadBody, match="ends before"):
        BodyDecoder("deflate", 1000).feed(b"", last=True)


def test_answers_are_compressed_as_accept_encoding_asks():
    from rayfine.serve.api import response_coding

    for header, coding in [(None, None), ("", None), ("identity", None), ("br", None), ("gzip, deflate", "gzip"),
                           ("deflate", "deflate"), ("gzip;q=0, deflate", "deflate"), ("GZIP ; q=0.5", "gzip"),
                           ("*", "gzip"), ("*;q=0", None), ("gzip;q=0, *", "deflate"), ("gzip;q=x", None)]:
        assert response_coding(header) == coding, header


def test_serve_section_is_validated_with_dotted_names():
    cfg = load_config("resnet18_digits_tiny")
    assert cfg.serve.host == "127.0.0.1"
    for overrides, message in [
        (["serve.max_items=40"], "max_items (40) must be at most max_batch_size"),
        (["serve.max_ongoing_requests=4"], "max_ongoing_requests (4) must be at least max_batch_size"),
        (["serve.image_formats=[PNG,EPS]"], "serve.image_formats.1"),
        (["serve.route_prefix=digits"], "serve.route_prefix: must be / or /name"),
        (["serve.cors_origins=[https://app.example/]"], "serve.cors_origins: 'https://app.example/' is not an origin"),
        (["serve.cors_origins=[app.example]"], "serve.cors_origins: 'app.example' is not an origin"),
        (["serve.cors_origins=[https://app.example:443]"], "leave the scheme's default port out"),
        (["serve.autoscaling=true", "serve.min_replicas=3"], "min_replicas (3) must be at most max_replicas"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            load_config("resnet18_digits_tiny", overrides)


def test_deployment_options_fixed_or_autoscaling():
    from rayfine.serve.app import deployment_options

    fixed = deployment_options(ServeConfig(num_replicas=3, cpus_per_replica=0.5, max_batch_size=8, max_items=8,
                                           max_ongoing_requests=12))
    assert fixed == {"max_ongoing_requests": 12, "max_queued_requests": 256, "num_replicas": 3,
                     "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.0}}
    auto = deployment_options(ServeConfig(autoscaling=True, min_replicas=0, max_replicas=4, target_ongoing_requests=6,
                                          gpus_per_replica=1))
    assert "num_replicas" not in auto and auto["ray_actor_options"]["num_gpus"] == 1
    assert auto["autoscaling_config"] == {"min_replicas": 0, "initial_replicas": 1, "max_replicas": 4,
                                          "target_ongoing_requests": 6, "upscale_delay_s": 30.0,
                                          "downscale_delay_s": 600.0, "look_back_period_s": 30.0}
    # Ray Serve accepts them as they are, with no deprecation or future warning (look_back_period_s
    # must be longer than Serve's 10 s metrics interval; rayfine refuses shorter ones by name).
    from ray.serve.config import AutoscalingConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AutoscalingConfig(**auto["autoscaling_config"])
    with pytest.raises(ValueError, match="look_back_period_s"):
        ServeConfig(autoscaling=True, look_back_period_s=10)


def test_api_key_comes_from_a_file_or_the_environment_never_the_config(tmp_path):
    from rayfine.errors import CheckpointError
    from rayfine.serve.app import read_api_key

    assert read_api_key(ServeConfig(), environ={}) is None
    assert read_api_key(ServeConfig(api_key_env="K"), environ={"K": " s3cret\n"}) == b"s3cret"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert read_api_key(ServeConfig(api_key_file=str(key_file)), environ={"RAYFINE_API_KEY": "env"}) == b"from-file"
    with pytest.raises(CheckpointError, match="api_key_file"):  # configured but missing: never serve open
        read_api_key(ServeConfig(api_key_file=str(tmp_path / "missing")), environ={})


def test_build_app_args_are_checked(tmp_path):
    from rayfine.errors import CheckpointError
    from rayfine.serve.app import build_app, resolve_checkpoint

    with pytest.raises(ConfigError, match="build_app args: .*checkpoint.*allowed: checkpoint, name, serve"):
        build_app({"chekpoint": "x"})
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path)
    # A tune run directory's winner comes before its train checkpoint.
    for sub in ("train/checkpoint", "tune/best/checkpoint"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "model.safetensors").write_bytes(b"")
        (tmp_path / sub / "config.yaml").write_text("")
    assert resolve_checkpoint(tmp_path) == (tmp_path / "tune/best/checkpoint").resolve()
    assert resolve_checkpoint(tmp_path / "train") == (tmp_path / "train/checkpoint").resolve()
    # An export stopped between its two renames left the winner aside as checkpoint.old: the run's
    # other model (train/checkpoint) is not served in its place.
    (tmp_path / "tune/best/checkpoint").rename(tmp_path / "tune/best/checkpoint.old")
    with pytest.raises(CheckpointError, match=r"tune/best/checkpoint is missing and .*checkpoint.old holds the "
                                              r"checkpoint it replaced: .*rename checkpoint.old back to checkpoint"):
        resolve_checkpoint(tmp_path)


def test_text_pair_models_take_text_pairs_and_single_text_models_refuse_them():
    """A model trained on text pairs (data.text_pair_column) takes [text, pair] on /predict and
    BYTES [N, 2] in v2, each text checked as a single text is; a single-text model refuses lists."""
    import tritonclient.http as tc

    assert protocol.predict_items(PredictRequest(inputs=[["a man sleeps", "a person rests"], ["hi", "bye"]]), "text", LIMITS,
                                  pairs=True) == [["a man sleeps", "a person rests"], ["hi", "bye"]]
    for inputs, message in [
        (["a man sleeps"], "input 0: this model takes text pairs, [text, pair]; got a str"),
        ([["a", "b", "c"]], "input 0: this model takes text pairs, [text, pair]; got a list of 3"),
        ([["a", 3]], "input 0 pair: expected a string, got int"),
        ([["  ", "b"]], "input 0 text: empty text"),
        ([["a", "x" * 21]], "input 0 pair: text of 21 characters exceeds the limit of 20"),
    ]:
        with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
            protocol.predict_items(PredictRequest(inputs=inputs), "text", LIMITS, pairs=True)
        assert e.value.status == 400
    with pytest.raises(RequestError, match=r"input 0: this model takes single texts, not lists") as e:
        protocol.predict_items(PredictRequest(inputs=[["a", "b"]]), "text", LIMITS)
    assert e.value.status == 400

    pairs = [["a fine film", "a good one"], ["dull", "héllo"]]
    for data in (pairs, [t for pair in pairs for t in pair]):  # nested or flat, row-major
        req = v2([{"name": "text", "shape": [2, 2], "datatype": "BYTES", "data": data}])
        assert protocol.v2_items(req, "text", LIMITS, pairs=True) == pairs
    encoded = v2([{"name": "text", "shape": [1, 2], "datatype": "BYTES", "parameters": {"content_type": "base64"},
                   "data": [b64(t.encode()) for t in pairs[1]]}])
    assert protocol.v2_items(encoded, "text", LIMITS, pairs=True) == [pairs[1]]
    t = tc.InferInput("text", [2, 2], "BYTES")
    t.set_data_from_numpy(np.array(pairs, dtype=np.object_), binary_data=True)
    body, header = triton_body([t])
    head, binary = protocol.split_body(body, header)
    assert protocol.v2_items(protocol.parse_json(InferenceRequest, head), "text", LIMITS, binary, pairs=True) == pairs
    for shape, data, pair_model, message in [
        ([2], ["a", "b"], True, "shape must be [N, 2] (a text and its pair per row), got [2]"),
        ([1, 1], ["a"], True, "shape must be [N, 2]"),
        ([2, 2], ["a", "b", "c"], True, "shape [2, 2] needs 4 elements, data has 3"),
        ([5, 2], ["a"] * 10, True, "too many items: 5"),
        ([1, 2], ["a", " "], True, "input 'text' 0 pair: empty text"),
        ([1, 2], ["a", "b"], False, "shape must be [N] (or [N, 1]), got [1, 2]"),
    ]:
        with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
            protocol.v2_items(v2([{"name": "text", "shape": shape, "datatype": "BYTES", "data": data}]), "text", LIMITS,
                              pairs=pair_model)
    assert protocol.model_inputs("text", 3, pairs=True) == [protocol.MetadataTensor(name="text", datatype="BYTES", shape=[-1, 2])]
    assert protocol.model_inputs("text", 3) == [protocol.MetadataTensor(name="text", datatype="BYTES", shape=[-1])]
    # A multipart field carries one text: pairs go as JSON, and the refusal says so.
    with pytest.raises(RequestError, match=r"this model takes text pairs: send them as JSON") as e:
        protocol.upload_items([], ["a man sleeps"], "text", LIMITS, pairs=True)
    assert e.value.status == 400


def test_json_numbers_are_not_coerced_from_other_types():
    """shape and top_k are JSON integers, pixels JSON numbers: strings, booleans and (for integers)
    floats are refused with the field's name, never read as numbers."""
    for shape in ('["1"]', "[1.0]", "[true]"):
        body = f'{{"inputs": [{{"name": "text", "shape": {shape}, "datatype": "BYTES", "data": ["a"]}}]}}'.encode()
        with pytest.raises(RequestError, match=r"inputs\.0\.shape\.0: Input should be a valid integer"):
            protocol.parse_json(InferenceRequest, body)
    for top_k in ("true", '"2"', "100.0"):
        with pytest.raises(RequestError, match=r"top_k: Input should be a valid integer"):
            protocol.parse_json(PredictRequest, f'{{"inputs": ["a"], "top_k": {top_k}}}'.encode())
    assert protocol.parse_json(PredictRequest, b'{"inputs": ["a"], "top_k": 2}').top_k == 2
    for value, name in (("5", "str"), (True, "bool"), (None, "NoneType")):
        for data in ([value], [[value]], [[0, value]]):
            shape = [1, 1, len(data[0]) if isinstance(data[0], list) else 1]
            req = v2([{"name": "pixels", "shape": shape, "datatype": "UINT8", "data": data}])
            with pytest.raises(RequestError, match=f"input 'pixels': data elements must be JSON numbers, got {name}"):
                protocol.v2_items(req, "image", LIMITS)
    ok = protocol.v2_items(v2([{"name": "pixels", "shape": [1, 1, 2], "datatype": "FP32", "data": [0, 0.5]}]), "image", LIMITS)
    assert ok[0].tolist() == [[0.0, 0.5]]


def test_a_gzip_body_of_several_members_is_their_concatenation():
    """A gzip file is a series of members (RFC 1952 2.2): each is decompressed in turn, within one
    size limit for all of them; data after a member that is not a gzip member is still refused."""
    import gzip

    from rayfine.serve.api import BadBody, BodyDecoder, BodyTooLarge

    parts = [b'{"inputs": ["a fine', b' film"]}', b""]
    data = b"".join(gzip.compress(p) for p in parts)
    body = b"".join(parts)
    assert BodyDecoder("gzip", len(body)).feed(data, last=True) == body
    decoder = BodyDecoder("x-gzip", len(body))  # a byte at a time: members end and start mid-chunk
    assert b"".join(decoder.feed(data[i:i + 1], last=i == len(data) - 1) for i in range(len(data))) == body
    with pytest.raises(BodyTooLarge, match=f"limit of {len(body) - 1} bytes"):  # the limit counts every member
        BodyDecoder("gzip", len(body) - 1).feed(data, last=True)
    for tail, message in [(b"not gzip", "the body's data after gzip member 1 is not a gzip member"),
                          (gzip.compress(b"x")[:-4], "the body ends before its gzip data does")]:
        with pytest.raises(BadBody, match=message):
            BodyDecoder("gzip", 1000).feed(gzip.compress(b"x") + tail, last=True)


def test_served_url_brackets_an_ipv6_host():
    from rayfine.serve.deploy import _url

    def url(host: str, prefix: str = "/") -> str:
        return _url({"http_options": {"host": host, "port": 8000}}, prefix)

    assert url("::1") == "http://[::1]:8000"  # RFC 3986 3.2.2: else its colons read as a port
    assert url("fe80::1%eth0", "/nli") == "http://[fe80::1%25eth0]:8000/nli"  # RFC 6874: the zone's % as %25
    assert url("[::1]") == "http://[::1]:8000"
    assert url("127.0.0.1", "/nli") == "http://127.0.0.1:8000/nli"


def test_replicas_report_their_serve_settings_and_a_swap_names_what_it_would_change():
    import asyncio

    import torch

    from rayfine.serve.app import Classifier
    from rayfine.serve.deploy import settings_changes

    threads = torch.get_num_threads()  # a replica sets torch's threads for its process: this one's are restored
    try:
        replica = Classifier.func_or_class.__bases__[0]("m", LIMITS.model_dump_json())
    finally:
        torch.set_num_threads(threads)
    reported = asyncio.run(replica.info())["settings"]  # before a model is loaded, too
    assert ServeConfig.model_validate(reported) == LIMITS
    assert settings_changes(reported, LIMITS) == []
    assert settings_changes(reported, LIMITS.model_copy(update={"port": 8001, "max_text_chars": 50})) == [
        "serve.port 8000 -> 8001", "serve.max_text_chars 20 -> 50"]
    # Replicas of an older rayfine report no field added since: they run with its default.
    older = {k: v for k, v in reported.items() if k != "cors_origins"}
    assert settings_changes(older, LIMITS) == []
    assert settings_changes(older, LIMITS.model_copy(update={"cors_origins": ("https://app.example",)})) == [
        "serve.cors_origins [] -> ['https://app.example']"]


def test_a_swap_with_serve_overrides_compares_them_with_the_running_replicas_not_the_first_checkpoint(
        tmp_path, monkeypatch):
    """A swap changes the app's user_config only: its args still name the checkpoint it was first
    deployed from, which may be gone (or retrained) since. The swap's serve settings are checked
    against what the replicas report running. Serve's controller is replaced by fakes here."""
    import shutil

    import ray.serve
    import ray.serve.context

    from rayfine.checkpoints import save_checkpoint
    from rayfine.models import build_model
    from rayfine.serve import deploy as deploy_module
    from rayfine.serve.app import IMPORT_PATH, serve_settings

    cfg = load_config("resnet18_digits_tiny", ["name=m"])
    labels = [str(d) for d in range(10)]
    new = save_checkpoint(tmp_path / "new", build_model(cfg, labels), cfg, labels, {"epoch": 1, "val_accuracy": 0.5})
    first = tmp_path / "first"
    shutil.copytree(new, first)  # what the app was deployed from, then removed
    running = serve_settings(first, {"port": 8123})[1].model_dump(mode="json")
    shutil.rmtree(first)
    app = {"name": "m", "route_prefix": "/", "import_path": IMPORT_PATH,
           "args": {"checkpoint": str(first), "name": "m", "serve": {"port": 8123}},
           "deployments": [{"name": "Classifier", "user_config": {"checkpoint": str(first), "version": "0" * 12}}]}
    details = {"http_options": {"host": "127.0.0.1", "port": 8123},
               "applications": {"m": {"status": "RUNNING", "source": "declarative", "deployed_app_config": app}}}
    deployed = []
    fake_gcs_kv(monkeypatch)
    monkeypatch.setattr(ray.serve, "start", lambda **_: None)
    monkeypatch.setattr(ray.serve.context, "_get_global_client",
                        lambda: SimpleNamespace(deploy_apps=deployed.append))
    monkeypatch.setattr(deploy_module, "_details", lambda: details)
    monkeypatch.setattr(deploy_module, "served_info", lambda *_, **__: {"version": "0" * 12, "settings": running})
    monkeypatch.setattr(deploy_module, "_wait_for_version", lambda *_: {"version": "1" * 12, "api_key": False})

    result = deploy_module.deploy(new, name="m", serve_overrides={"port": 8123}, log=lambda *_: None)
    assert result["action"] == "swapped" and result["url"] == "http://127.0.0.1:8123" and result["api_key"] is False
    (schema,) = deployed
    (swapped,) = schema.applications
    assert swapped.args == app["args"]  # unchanged: Serve reconfigures the replicas instead of replacing them
    assert swapped.deployments[0].user_config["checkpoint"] == str(new.resolve())
    with pytest.raises(deploy_module.DeployError,
                       match=r"running with other serve settings \(serve.batch_wait_timeout_s 0.01 -> 0.5\)"):
        deploy_module.deploy(new, name="m", serve_overrides={"port": 8123, "batch_wait_timeout_s": 0.5},
                             log=lambda *_: None)
    assert len(deployed) == 1


def fake_gcs_kv(monkeypatch) -> tuple[dict, threading.Event]:
    """The GCS's key-value store (rayfine's deploy turn) as a dict; the event is set when a put
    with overwrite=False finds the key taken (a deploy waiting for its turn)."""
    from ray.experimental import internal_kv

    kv, refused, lock = {}, threading.Event(), threading.Lock()

    def put(key, value, overwrite=True, *, namespace=None):
        with lock:
            held = (namespace, key) in kv
            if overwrite or not held:
                kv[(namespace, key)] = value.encode() if isinstance(value, str) else value
            if held and not overwrite:
                refused.set()
            return held

    monkeypatch.setattr(internal_kv, "_internal_kv_put", put)
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key, *, namespace=None: kv.get((namespace, key)))
    monkeypatch.setattr(internal_kv, "_internal_kv_del",
                        lambda key, *, namespace=None: int(kv.pop((namespace, key), None) is not None))
    return kv, refused


@pytest.fixture
def fake_serve(tmp_path, monkeypatch):
    """Serve's controller replaced by fakes: ``details`` is what get_serve_details answers, ``deployed``
    what deploy_apps was given, ``served`` what the app's replicas say (info()). ``checkpoint(v)``
    saves a tiny digits checkpoint with val_accuracy ``v``."""
    import ray.serve
    import ray.serve.context

    from rayfine.checkpoints import save_checkpoint
    from rayfine.models import build_model
    from rayfine.serve import deploy as deploy_module

    cfg = load_config("resnet18_digits_tiny", ["name=digits"])
    labels = [str(d) for d in range(10)]
    fake = SimpleNamespace(details={"http_options": {"host": "127.0.0.1", "port": 8123}, "applications": {}},
                           deployed=[], served={}, module=deploy_module)
    fake.checkpoint = lambda v: save_checkpoint(tmp_path / f"ckpt_{v}", build_model(cfg, labels), cfg, labels,
                                                {"epoch": 1, "val_accuracy": v})
    monkeypatch.setattr(ray.serve, "start", lambda **_: None)
    fake.on_deploy = None  # what the replicas do when a config is applied: (schema) -> None

    def deploy_apps(schema):
        fake.deployed.append(schema)
        if fake.on_deploy:
            fake.on_deploy(schema)

    fake.answers = None  # an iterator of infos, one per handle call (the replica the handle picked), else ``served``
    monkeypatch.setattr(ray.serve.context, "_get_global_client",
                        lambda **_: SimpleNamespace(deploy_apps=deploy_apps, get_serve_details=lambda: fake.details))
    monkeypatch.setattr(deploy_module, "_details", lambda: fake.details)
    fake.nodes = [{"CPU": 2.0, "memory": 8e9}]  # the cluster's nodes' total resources
    monkeypatch.setattr(deploy_module, "_node_resources", lambda: fake.nodes)
    fake.kv, fake.kv_refused = fake_gcs_kv(monkeypatch)
    monkeypatch.setattr(deploy_module, "served_info", lambda *_, **__: next(fake.answers) if fake.answers else fake.served)

    def live(checkpoint, status: str = "RUNNING", route_prefix: str = "/", replicas: tuple[str, ...] = ()) -> dict:
        """App "digits" as a declarative deploy of ``checkpoint`` left it (``replicas``: the ids Serve's
        details list as RUNNING, when given); returns its deployed_app_config."""
        from rayfine.serve.app import IMPORT_PATH, user_config

        app = {"name": "digits", "route_prefix": route_prefix, "import_path": IMPORT_PATH,
               "args": {"checkpoint": str(checkpoint), "name": "digits"},
               "deployments": [{"name": "Classifier", "user_config": user_config(checkpoint)}]}
        fake.details["applications"]["digits"] = {"status": status, "source": "declarative", "route_prefix": route_prefix,
                                                  "deployed_app_config": app}
        if replicas:
            fake.details["applications"]["digits"]["deployments"] = {
                "Classifier": {"replicas": [{"replica_id": r, "state": "RUNNING"} for r in replicas]}}
        return app

    fake.live = live
    return fake


def test_a_deploy_to_an_unhealthy_app_is_a_swap_with_its_checks_not_a_new_app(fake_serve):
    """Serve calls an app UNHEALTHY while it still serves (a replica failed a health check): a
    deploy of that name is a swap of the running app (--if-better compares, the route stays), not
    a new app built over it. The cluster's target_capacity is kept in the config applied."""
    from rayfine.serve.app import user_config

    old, new = fake_serve.checkpoint(0.99), fake_serve.checkpoint(0.5)
    app = fake_serve.live(old, status="UNHEALTHY", route_prefix="/digits")
    fake_serve.details["target_capacity"] = 50.0
    fake_serve.served.update(version=user_config(old)["version"], checkpoint=str(old), metrics={"val_accuracy": 0.99})
    result = fake_serve.module.deploy(new, name="digits", if_better=True, log=lambda *_: None)
    assert result["action"] == "kept" and result["url"] == "http://127.0.0.1:8123/digits", result
    assert fake_serve.deployed == []

    better = fake_serve.checkpoint(0.995)
    # The replica swaps; the app stays UNHEALTHY (another replica's health check), and the swap is
    # seen through the replica that serves.
    fake_serve.details["applications"]["digits"]["deployments"] = {
        "Classifier": {"replicas": [{"replica_id": "r1", "state": "RUNNING"}]}}
    fake_serve.on_deploy = lambda schema: fake_serve.served.update(replica="r1", **user_config(better))
    result = fake_serve.module.deploy(better, name="digits", if_better=True, timeout_s=5, log=lambda *_: None)
    assert result["action"] == "swapped"
    (schema,) = fake_serve.deployed
    assert schema.target_capacity == 50.0
    (swapped,) = schema.applications
    assert swapped.route_prefix == "/digits" and swapped.args == app["args"]  # reconfigured in place


def test_a_new_app_is_refused_a_route_prefix_another_app_serves(fake_serve):
    """Serve's declarative deploy does not refuse a route a `serve.run` app holds; the two apps
    would take turns answering it. Two declarative apps on one route are Serve's ValidationError,
    which is said plainly."""
    from rayfine.serve.app import IMPORT_PATH

    ckpt = fake_serve.checkpoint(0.9)
    fake_serve.details["applications"]["mine"] = {"status": "RUNNING", "source": "imperative", "route_prefix": "/",
                                                  "deployed_app_config": None}
    with pytest.raises(fake_serve.module.DeployError, match=r"route prefix '/' is taken by app 'mine': serve "
                                                            r"'digits' under another \(--set serve.route_prefix=/digits\)"):
        fake_serve.module.deploy(ckpt, name="digits", log=lambda *_: None)
    assert fake_serve.deployed == []
    # Two declarative apps that name one route (a config edited by hand): Serve's schema refuses it.
    other = {"name": "other", "route_prefix": "/x", "import_path": IMPORT_PATH, "args": {"checkpoint": str(ckpt)}}
    with pytest.raises(fake_serve.module.DeployError, match="Serve refuses the apps' config: .*route_prefix"):
        fake_serve.module._apply([other, {**other, "name": "other2"}], None)


def test_a_swap_the_replicas_cannot_load_is_rolled_back(fake_serve):
    """A replica that cannot load the new checkpoint keeps its model and says why (info's
    swap_error); deploy then puts the app's config back, so that a replica Serve starts later does
    not try that checkpoint, and says what still serves."""
    from rayfine.serve.app import user_config

    old, new = fake_serve.checkpoint(0.9), fake_serve.checkpoint(0.95)
    fake_serve.live(old)
    fake_serve.served.update(version=user_config(old)["version"], checkpoint=str(old), metrics={"val_accuracy": 0.9},
                             swap_error={"user_config": user_config(new), "error": "CheckpointError: unreadable"})
    with pytest.raises(fake_serve.module.DeployError,
                       match=rf"could not load {new}: CheckpointError: unreadable; 'digits' keeps serving version "
                             rf"{user_config(old)['version']}"):
        fake_serve.module.deploy(new, name="digits", timeout_s=5, log=lambda *_: None)
    tried, rolled_back = fake_serve.deployed
    assert tried.applications[0].deployments[0].user_config == user_config(new)
    assert rolled_back.applications[0].deployments[0].user_config == {"checkpoint": str(old),
                                                                       "version": user_config(old)["version"]}


def test_a_swap_that_fails_on_one_replica_of_two_is_rolled_back(fake_serve):
    """A checkpoint path only some nodes read: one replica swaps, the other cannot. The swap is not
    done until every running replica answers with the new version; one that reports it could not
    load it fails the swap, which is rolled back (the replica that swapped goes back too)."""
    import itertools

    from rayfine.serve.app import user_config

    old, new = fake_serve.checkpoint(0.9), fake_serve.checkpoint(0.95)
    fake_serve.live(old, replicas=("r1", "r2"))
    before = {"checkpoint": str(old), **user_config(old), "metrics": {"val_accuracy": 0.9}}
    swapped = {**before, **user_config(new), "replica": "r1", "swap_error": None}
    stuck = {**before, "replica": "r2", "swap_error": {"user_config": user_config(new), "error": "OSError: no such file"}}
    # The first answer (deploy's own look at the app), then r1, r1, r1, r2 as the handle picks them.
    fake_serve.answers = itertools.chain([{**before, "replica": "r1"}, swapped, swapped, swapped],
                                         itertools.repeat(stuck))
    with pytest.raises(fake_serve.module.DeployError, match=r"could not load .*: OSError: no such file; 'digits' keeps"):
        fake_serve.module.deploy(new, name="digits", timeout_s=5, log=lambda *_: None)
    assert [d.applications[0].deployments[0].user_config["version"] for d in fake_serve.deployed] == [
        user_config(new)["version"], user_config(old)["version"]]


def test_rayfine_run_refuses_before_its_search_to_swap_into_an_app_with_other_serve_settings(fake_serve, monkeypatch):
    """`rayfine run` swaps its winner into a live app of its name, and a swap changes the model
    only: a run whose serve: settings differ from those the replicas run with is refused before the
    search (was: the search ran, the swap kept the old settings and said "swapped"); the deploy at
    its end checks again. `rayfine serve OTHER` without --set still swaps (the app's settings kept)."""
    import rayfine.pipeline
    import rayfine.tune
    from rayfine.checkpoints import save_checkpoint
    from rayfine.models import build_model
    from rayfine.serve.app import user_config
    from rayfine.serve.model import model_api

    old = fake_serve.checkpoint(0.9)
    fake_serve.live(old, replicas=("r1",))
    running = load_config("resnet18_digits_tiny", ["name=digits"]).serve
    fake_serve.served.update(replica="r1", **user_config(old), metrics={"val_accuracy": 0.9},
                             settings=running.model_dump(mode="json"))
    cfg = load_config("resnet18_digits_tiny", ["name=digits", "serve.max_batch_size=24"])
    searched = []
    monkeypatch.setattr(rayfine.tune, "run_search", lambda *a, **k: searched.append(a))
    refused = r"app 'digits' is running with other serve settings \(serve.max_batch_size 16 -> 24\)"
    with pytest.raises(fake_serve.module.DeployError, match=refused + r".*or run with its settings: --set serve"):
        rayfine.pipeline.run_pipeline(cfg, log=lambda *_: None)
    assert searched == []  # refused before the search
    api = model_api(cfg)
    fake_serve.module.check_swap("digits", running, api)  # the same settings: nothing to refuse
    fake_serve.module.check_swap("other", cfg.serve, api)  # no such app
    fake_serve.details["applications"]["mine"] = {"status": "RUNNING", "source": "imperative", "route_prefix": "/m",
                                                  "deployed_app_config": None}
    with pytest.raises(fake_serve.module.DeployError, match=r"serve.run \(imperative\).* run under another name "
                                                            r"\(--set name=...\)"):  # `rayfine run` has no --name
        fake_serve.module.check_swap("mine", running, api)
    # Connecting to Serve turns off this driver's filter of other jobs' worker logs (ray/serve/context.py
    # _connect); the check puts it back, so that the search does not print every job's logs.
    import ray
    import ray.serve.context

    client = ray.serve.context._get_global_client

    def connect(**kwargs):
        ray._private.worker.global_worker._filter_logs_by_job = False
        return client(**kwargs)

    monkeypatch.setattr(ray.serve.context, "_get_global_client", connect)
    monkeypatch.setattr(ray._private.worker.global_worker, "_filter_logs_by_job", True)  # a fresh driver's
    fake_serve.module.check_swap("digits", running, api)
    assert ray._private.worker.global_worker._filter_logs_by_job is True

    labels = [str(d) for d in range(10)]
    winner = save_checkpoint(fake_serve.checkpoint(0.95).parent / "winner", build_model(cfg, labels), cfg, labels,
                             {"epoch": 1, "val_accuracy": 0.95})
    with pytest.raises(fake_serve.module.DeployError, match=refused + r".*or run with its settings"):
        fake_serve.module.deploy(winner, name="digits", if_better=True, same_settings=True, log=lambda *_: None)
    assert fake_serve.deployed == []
    fake_serve.on_deploy = lambda schema: fake_serve.served.update(**user_config(winner))
    result = fake_serve.module.deploy(winner, name="digits", if_better=True, timeout_s=5, log=lambda *_: None)
    assert result["action"] == "swapped"


def test_a_swap_that_would_change_what_the_apps_clients_send_or_get_back_is_refused(fake_serve, monkeypatch):
    """A hot swap replaces the model behind clients that send the app's kind of input and read its
    labels, and the columns of 'probabilities' in their order. A checkpoint of another task is
    refused with what it would change, --if-better included (was: swapped, after comparing the
    validation accuracy of two different tasks); `rayfine run` refuses another kind of input before
    its search. Nothing is applied."""
    import rayfine.pipeline
    import rayfine.tune
    from rayfine.checkpoints import save_checkpoint
    from rayfine.models import build_model
    from rayfine.serve.app import user_config
    from rayfine.serve.model import model_api

    cfg = load_config("resnet18_digits_tiny", ["name=digits"])
    digits = [str(d) for d in range(10)]
    old = fake_serve.checkpoint(0.9)
    fake_serve.live(old)
    fake_serve.served.update(**user_config(old), metrics={"val_accuracy": 0.9}, **model_api(cfg, digits))

    def saved(name: str, labels: list[str], accuracy: float = 0.99):
        return save_checkpoint(old.parent / name, build_model(cfg, labels), cfg, labels,
                               {"epoch": 1, "val_accuracy": accuracy})

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    cases = [
        (saved("words", words), (r"labels: 10 -> 10 \('0', '1', '2', '3', '4' and 5 more only served now; 'zero', "
                                 r"'one', 'two', 'three', 'four' and 5 more only new\)")),
        (saved("fewer", digits[:9]), r"labels: 10 -> 9 \('9' only served now\)"),
        (saved("reversed", digits[::-1]), r"the same 10 labels in another order \(the columns of 'probabilities'\)"),
    ]
    for checkpoint, change in cases:
        for if_better in (False, True):
            with pytest.raises(fake_serve.module.DeployError,
                               match=rf"app 'digits' serves another task \({change}\): a hot swap keeps what the "
                                     r"app's clients send and get back; choose another --name, or stop the app"):
                fake_serve.module.deploy(checkpoint, name="digits", if_better=if_better, log=lambda *_: None)
    # The same weights under other label names (version = the weights' hash): refused, not "unchanged".
    renamed = old.parent / "renamed"
    shutil.copytree(old, renamed)
    (renamed / "labels.json").write_text(json.dumps(words))
    with pytest.raises(fake_serve.module.DeployError, match=r"serves another task \(labels: 10 -> 10"):
        fake_serve.module.deploy(renamed, name="digits", log=lambda *_: None)
    assert fake_serve.deployed == []

    text = load_config("minilm_rotten_tomatoes_tiny", ["name=digits"])
    searched = []
    monkeypatch.setattr(rayfine.tune, "run_search", lambda *a, **k: searched.append(a))
    with pytest.raises(fake_serve.module.DeployError, match=r"serves another task \(inputs: image -> text\).* "
                                                            r"run under another name \(--set name=...\)"):
        rayfine.pipeline.run_pipeline(text, log=lambda *_: None)
    assert searched == [] and fake_serve.deployed == []

    # The same labels: swapped.
    better = saved("better", digits)
    fake_serve.on_deploy = lambda schema: fake_serve.served.update(**user_config(better))
    assert fake_serve.module.deploy(better, name="digits", if_better=True, timeout_s=5,
                                    log=lambda *_: None)["action"] == "swapped"


def test_api_changes_names_a_change_of_text_pairs_and_compares_only_what_both_sides_say():
    from rayfine.serve.deploy import api_changes

    texts = {"kind": "text", "pairs": False, "labels": ["neg", "pos"]}
    assert api_changes(texts, {**texts, "pairs": True}) == ["inputs: texts -> [text, pair] rows"]
    assert api_changes({**texts, "pairs": True}, texts) == ["inputs: [text, pair] rows -> texts"]
    assert api_changes(texts, {"kind": "image", "pairs": False, "labels": ["neg", "pos"]}) == ["inputs: text -> image"]
    assert api_changes(texts, dict(texts)) == []
    # Replicas of an earlier rayfine say no "pairs"; `rayfine run` knows no labels before its data is read.
    assert api_changes({"kind": "text", "labels": ["neg", "pos"]}, {**texts, "pairs": True}) == []
    assert api_changes(texts, {**texts, "labels": None}) == []
    assert api_changes({}, texts) == []


# --- a real replica, without Ray or Serve: its HTTP API over ASGI -------------------------------------

KEY = "k-" + "7" * 16


@pytest.fixture(scope="module")
def nli(tmp_path_factory):
    """The Classifier replica, as Serve builds it, serving a text-pair model (MiniLM with an
    untrained head, trained on pairs as far as its config goes) behind an API key; requests go
    through its ASGI app, batcher and forward pass in this process."""
    import asyncio

    import torch
    from starlette.testclient import TestClient

    from rayfine.checkpoints import save_checkpoint
    from rayfine.data import tokenizer_source
    from rayfine.data.text import load_tokenizer
    from rayfine.models import build_model
    from rayfine.serve.app import Classifier

    root = tmp_path_factory.mktemp("nli")
    cfg = load_config("minilm_rotten_tomatoes_tiny", ["name=nli", "data.text_pair_column=hypothesis"])
    labels = ["contradiction", "entailment"]
    checkpoint = save_checkpoint(root / "checkpoint", build_model(cfg, labels), cfg, labels, {"epoch": 1},
                                 tokenizer=load_tokenizer(tokenizer_source(cfg)))
    (root / "key").write_text(KEY + "\n")
    threads = torch.get_num_threads()  # a replica sets torch's threads for its process: this one's are restored
    # Serve's @serve.ingress subclasses the replica class with its ASGI plumbing; its base is the class itself.
    replica_class = Classifier.func_or_class.__bases__[0]
    assert replica_class.__name__ == "Classifier"
    settings = LIMITS.model_copy(update={"max_text_chars": 200, "api_key_file": str(root / "key")})
    replica = replica_class("nli", settings.model_dump_json())
    asyncio.run(replica.reconfigure({"checkpoint": str(checkpoint)}))
    try:
        with TestClient(replica.__serve_build_asgi_app__(), headers={"X-API-Key": KEY}) as client:
            yield SimpleNamespace(client=client, checkpoint=checkpoint, labels=labels, replica=replica)
    finally:
        torch.set_num_threads(threads)


def test_a_text_pair_model_answers_pairs_over_http(nli):
    from rayfine.checkpoints import load_checkpoint
    from rayfine.data import Preprocessor

    meta = nli.client.get("/v2/models/nli").json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1, 2]}]
    pairs = [["A man is sleeping.", "A person rests."], ["A dog runs in a park.", "The cat is asleep."]]
    ckpt = load_checkpoint(nli.checkpoint)
    expected = ckpt.predict_proba(Preprocessor(ckpt.cfg, str(nli.checkpoint))(pairs)).numpy()

    r = nli.client.post("/v2/models/nli/infer", json={"inputs": [{"name": "text", "shape": [2, 2], "datatype": "BYTES",
                                                                   "data": pairs}]})
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert np.allclose(np.reshape(out["probabilities"]["data"], (2, 2)), expected, atol=1e-5)
    r = nli.client.post("/predict", json={"inputs": pairs, "top_k": 1})
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == [nli.labels[i] for i in expected.argmax(1)]
    assert np.allclose([p["score"] for p in r.json()["predictions"]], expected.max(1), atol=1e-5)
    for kwargs, message in [
        ({"json": {"inputs": ["A man is sleeping."]}}, "input 0: this model takes text pairs, [text, pair]; got a str"),
        ({"json": {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": pairs[0]}]}},
         "shape must be [N, 2]"),
        ({"files": [("inputs", (None, "A man is sleeping."))]}, "this model takes text pairs: send them as JSON"),
    ]:
        path = "/predict" if "files" in kwargs or "name" not in str(kwargs) else "/v2/models/nli/infer"
        r = nli.client.post(path, **kwargs)
        assert r.status_code == 400 and message in r.json()["error"], (path, r.status_code, r.text)


def test_an_unsupported_content_encoding_is_answered_with_the_accepted_ones(nli):
    r = nli.client.post("/predict", content=b"{}", headers={"Content-Type": "application/json", "Content-Encoding": "br"})
    assert r.status_code == 415 and "Content-Encoding br is not accepted" in r.json()["error"]
    assert r.headers["Accept-Encoding"] == "gzip, deflate"  # RFC 9110 12.5.3, 15.5.16
    import gzip

    body = gzip.compress(b'{"inputs": [["A man is sleeping.", ') + gzip.compress(b'"A person rests."]]}')
    r = nli.client.post("/predict", content=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text


def test_an_empty_x_api_key_does_not_hide_a_bearer_token(nli):
    r = nli.client.get("/v2/models/nli", headers={"X-API-Key": "", "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    r = nli.client.get("/v2/models/nli", headers={"X-API-Key": ""})
    assert r.status_code == 401 and "missing API key" in r.json()["error"]
    r = nli.client.get("/v2/models/nli", headers={"X-API-Key": "", "Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"] == "invalid API key"


def test_either_header_may_carry_the_key(nli):
    """Bearer or X-API-Key, as the OpenAPI schema declares them: a gateway's own X-API-Key (or a
    client's stale one) does not lock out the caller's bearer token, nor the reverse."""
    for headers in ({"X-API-Key": "gateway-key", "Authorization": f"Bearer {KEY}"},
                    {"X-API-Key": KEY, "Authorization": "Bearer stale"}):
        assert nli.client.get("/v2/models/nli", headers=headers).status_code == 200, headers
    r = nli.client.get("/v2/models/nli", headers={"X-API-Key": "gateway-key", "Authorization": "Bearer stale"})
    assert r.status_code == 401 and r.json()["error"] == "invalid API key"


def test_a_path_with_more_than_one_trailing_slash_is_no_route_not_a_redirect(nli):
    """One trailing slash is the route itself; more are a 404 with a JSON reason. Starlette would
    answer 307 with an empty body, to an http:// URL built from the client's Host header."""
    assert nli.client.get("/v2/models/nli/").status_code == 200
    for method, path in (("GET", "/v2/models/nli//"), ("GET", "/v2//"), ("POST", "/predict//")):
        r = nli.client.request(method, path, follow_redirects=False)
        assert r.status_code == 404 and "no such route" in r.json()["error"], (path, r.status_code, r.text)


def test_a_client_gone_mid_body_is_a_4xx_not_an_internal_error(nli):
    """Starlette raises ClientDisconnect when the client leaves before its body ends: 499 in the log,
    as Ray Serve's proxy logs a client gone, not a 500 counted as the server's error."""
    import asyncio

    app = other_app(nli, key=False).app
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    incoming = [{"type": "http.request", "body": b'{"inputs": [', "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 499 and "disconnected" in json.loads(body)["error"], (start, body)


def test_an_input_that_cannot_be_preprocessed_is_named_by_its_place(tmp_path):
    """A request's bad image is named by its index, as the protocol's own checks name an input; the
    other requests of the batch get their answers."""
    from rayfine.checkpoints import save_checkpoint
    from rayfine.models import build_model
    from rayfine.serve.model import load_served, run_batch

    cfg = load_config("resnet18_digits_tiny")
    labels = [str(i) for i in range(10)]
    served = load_served(save_checkpoint(tmp_path / "c", build_model(cfg, labels), cfg, labels, {"epoch": 1}),
                         cfg.serve, device="cpu")
    good = png(np.full((8, 8), 200, np.uint8))
    answers = run_batch(served, [[good, good, good[:30]], [good]])
    assert answers[0].error.startswith("input 2: not a readable image"), answers[0].error
    assert answers[1].error is None and answers[1].probs.shape == (1, 10)


def test_server_metadata_names_rayfine_and_its_version(nli):
    from rayfine import __version__

    r = nli.client.get("/v2")
    assert r.status_code == 200 and r.json() == {"name": "rayfine", "version": __version__,
                                                 "extensions": ["binary_tensor_data", "classification", "statistics"]}

def test_405_allows_head_where_get_is_answered(nli):
    assert nli.client.head("/v2/models/nli").status_code == 200  # HEAD is served wherever GET is
    r = nli.client.post("/v2/models/nli")
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD"  # RFC 9110 10.2.1: every method served
    r = nli.client.get("/predict")
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    assert nli.client.head("/predict").status_code == 405


def other_app(nli, key: bool = True, **settings):
    """A client of the nli replica's model behind an app built with other serve settings or key
    (no inference: the replica's batcher belongs to the nli client's event loop)."""
    from starlette.testclient import TestClient

    from rayfine.serve.api import make_api

    replica = nli.replica
    server = SimpleNamespace(**{**vars(replica), "infer": replica.infer, "api_key": KEY.encode() if key else None,
                                "settings": ServeConfig.model_validate({**replica.settings.model_dump(), **settings})})
    return TestClient(make_api(server))


def test_cors_preflights_need_no_key_and_answers_name_the_origin(nli):
    origin = "https://app.example"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, x-api-key, content-type, inference-header-content-length"}
    # No serve.cors_origins (the default): no CORS, as before.
    assert load_config("resnet18_digits_tiny").serve.cors_origins == ()
    r = nli.client.get("/v2/models/nli", headers={"Origin": origin})
    assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)
    assert load_config("resnet18_digits_tiny", ['serve.cors_origins=["*"]']).serve.cors_origins == ("*",)
    with other_app(nli, cors_origins=[origin, "http://localhost:3000"]) as client:
        r = client.options("/v2/models/nli/infer", headers=preflight)  # no API key: a preflight carries none
        assert r.status_code == 200, r.text
        assert r.headers["Access-Control-Allow-Origin"] == origin
        assert {"GET", "POST"} <= {m.strip() for m in r.headers["Access-Control-Allow-Methods"].split(",")}
        allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "x-api-key", "content-type", "content-encoding", "inference-header-content-length",
                "accept-encoding"} <= allowed
        assert "Access-Control-Allow-Credentials" not in r.headers  # the key is a header, not a cookie
        r = client.options("/v2/models/nli/infer", headers={**preflight, "Origin": "https://evil.example"})
        assert r.status_code == 400 and "CORS preflight refused: Disallowed CORS origin" in r.json()["error"]
        assert "Access-Control-Allow-Origin" not in r.headers
        # Answers, refusals included, let the origin's scripts read them and the binary data header.
        for headers, status in (({"X-API-Key": KEY}, 200), ({}, 401)):
            r = client.get("/v2/models/nli", headers={"Origin": origin, **headers})
            assert r.status_code == status and r.headers["Access-Control-Allow-Origin"] == origin
            exposed = {h.strip().lower() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
            assert {"inference-header-content-length", "content-encoding"} <= exposed
        r = client.get("/v2/models/nli", headers={"Origin": "https://evil.example", "X-API-Key": KEY})
        assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers
    with other_app(nli, cors_origins=["*"]) as client:
        r = client.options("/predict", headers={**preflight, "Origin": "https://any.example"})
        assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "*"


def test_docs_and_schema_are_open_and_the_schema_declares_the_key(nli):
    client = nli.client
    for path in ("/docs", "/docs/oauth2-redirect", "/openapi.json"):
        r = client.get(path, headers={"X-API-Key": ""})
        assert r.status_code == 200, (path, r.status_code, r.text)
    assert client.get("/docs/other", headers={"X-API-Key": ""}).status_code == 401  # exactly those paths
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"}, "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path.startswith("/v2/health/"):
                assert "security" not in operation and "401" not in operation["responses"], (path, method)
            else:
                assert operation["security"] == [{"bearer": []}, {"apiKey": []}], (path, method)
                assert operation["responses"]["401"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"}, (path, method)
    with other_app(nli, key=False) as open_client:  # no key: nothing to declare
        schema = open_client.get("/openapi.json").json()
        assert "securitySchemes" not in schema["components"]
        assert not any("security" in op or "401" in op["responses"] for ops in schema["paths"].values() for op in ops.values())


def test_the_schema_declares_the_errors_the_routes_give_not_fastapis_422(nli):
    schema = nli.client.get("/openapi.json").json()
    assert "422" not in json.dumps(schema) and "HTTPValidationError" not in schema["components"]["schemas"]
    error = {"$ref": "#/components/schemas/ErrorResponse"}

    def declared(path, method="get"):
        responses = schema["paths"][path][method]["responses"]
        return {int(code) for code, r in responses.items()
                if code != "200" and r.get("content", {}).get("application/json", {}).get("schema") == error}

    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        assert declared(path, "post") == {400, 401, 404, 413, 415, 503}
    assert declared("/predict", "post") == {400, 401, 413, 415, 503}
    for path in ("/v2/models/{name}", "/v2/models/{name}/ready", "/v2/models/{name}/versions/{version}/stats"):
        assert declared(path) == {401, 404, 503}
    # What FastAPI declared 422 for is answered 400 {"error": ...}.
    r = nli.client.post("/predict?top_k=x", json={"inputs": [["A man sleeps.", "A person rests."]]})
    assert r.status_code == 400 and "top_k" in r.json()["error"]


def test_a_v2_body_of_any_type_but_multipart_is_read_as_json_and_predict_takes_no_type_as_json(nli):
    """Triton does not check Content-Type on /infer: curl -d (a form's type), a browser's fetch with
    a string body (text/plain) and tritonclient (none) send JSON all the same."""
    body = json.dumps({"inputs": [{"name": "text", "shape": [1, 2], "datatype": "BYTES",
                                   "data": [["A man sleeps.", "A person rests."]]}]}).encode()
    for ctype in ("application/x-www-form-urlencoded", "text/plain;charset=UTF-8", "application/octet-stream", None):
        r = nli.client.post("/v2/models/nli/infer", content=body, headers={"Content-Type": ctype} if ctype else {})
        assert r.status_code == 200 and r.json()["outputs"][0]["name"] == "label", (ctype, r.text)
    r = nli.client.post("/v2/models/nli/infer", content=body, headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 415 and "Content-Type must be application/json or application/octet-stream" in r.json()["error"]
    predict = json.dumps({"inputs": [["A man sleeps.", "A person rests."]], "top_k": 1}).encode()
    r = nli.client.post("/predict", content=predict)  # requests.post(url, data=json.dumps(...)): no Content-Type
    assert "content-type" not in r.request.headers
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1, r.text
    r = nli.client.post("/predict", content=predict, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json or multipart/form-data, got text/plain" in r.json()["error"]


def test_a_trailing_slash_is_the_path_without_it(nli):
    r = nli.client.get("/v2/health/ready/", headers={"X-API-Key": ""})  # health needs no key, slash or not
    assert r.status_code == 200 and r.json() == {"ready": True}
    r = nli.client.get("/v2/", follow_redirects=False)
    assert r.status_code == 200 and r.json()["name"] == "rayfine"
    r = nli.client.post("/v2/models/nli/infer/", follow_redirects=False, json={"inputs": [
        {"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": [["A man sleeps.", "A person rests."]]}]})
    assert r.status_code == 200, r.text
    assert nli.client.get("/v2/models/nli/", headers={"X-API-Key": ""}).status_code == 401  # the key still applies
    assert nli.client.get("/v2/models/nli//", follow_redirects=False).status_code != 200  # one slash only
    r = nli.client.get("/", follow_redirects=False)
    assert r.status_code == 404 and "no such route" in r.json()["error"]


def test_every_v2_answer_varies_on_accept_encoding_and_labels_are_a_string_parameter(nli):
    body = {"inputs": [{"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": [["A man sleeps.", "A person rests."]]}]}
    for accept in ("identity", "gzip"):
        r = nli.client.post("/v2/models/nli/infer", json=body, headers={"Accept-Encoding": accept})
        assert r.status_code == 200 and r.headers["Vary"] == "Accept-Encoding", (accept, r.headers)
        assert r.headers.get("Content-Encoding") == (None if accept == "identity" else "gzip")
        labels = {o["name"]: o for o in r.json()["outputs"]}["probabilities"]["parameters"]["labels"]
        assert isinstance(labels, str) and json.loads(labels) == nli.labels


def test_requests_queued_before_a_hot_swap_run_on_the_model_they_were_checked_against(monkeypatch):
    """README: requests in flight finish on the model they started with. Requests pinned to version
    AAA queue behind a running forward pass while the replica swaps in BBB: AAA answers them, BBB
    the requests that came after the swap, and no forward pass mixes the two models."""
    import asyncio

    import httpx
    import torch

    from rayfine.serve import app as app_module
    from rayfine.serve.model import Answer, ServedModel

    def served(version: str) -> ServedModel:
        cfg = SimpleNamespace(data=SimpleNamespace(kind="text", text_pair_column=None))
        return ServedModel(f"/checkpoints/{version}", version, cfg, ["neg", "pos"], {}, None, None, "cpu")

    old, new = served("AAA"), served("BBB")
    running, release = threading.Event(), threading.Event()
    passes: list[tuple[str, list]] = []  # (the version that ran it, its items)

    def run_batch(model, requests):  # the forward pass, in a thread as the real one: held until released
        passes.append((model.version, [item for items in requests for item in items]))
        running.set()
        release.wait(30)
        return [Answer(model.version, model.labels, probs=np.full((len(items), 2), 0.5, np.float32)) for items in requests]

    monkeypatch.setattr(app_module, "run_batch", run_batch)
    settings = LIMITS.model_copy(update={"api_key_env": "RAYFINE_TEST_UNSET_KEY", "batch_wait_timeout_s": 0.0})
    threads = torch.get_num_threads()  # a replica sets torch's threads for its process: this one's are restored
    replica = app_module.Classifier.func_or_class.__bases__[0]("m", settings.model_dump_json())
    torch.set_num_threads(threads)
    replica.model = old

    def body(text: str) -> dict:
        return {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}

    async def until_queued(n: int) -> None:
        while replica.batcher._queued_items() < n:
            await asyncio.sleep(0.01)

    async def main():
        transport = httpx.ASGITransport(app=replica.__serve_build_asgi_app__())
        async with httpx.AsyncClient(transport=transport, base_url="http://replica", timeout=30) as client:
            first = asyncio.create_task(client.post("/v2/models/m/infer", json=body("first")))
            await asyncio.to_thread(running.wait, 30)  # AAA's forward pass runs
            pinned = [asyncio.create_task(client.post("/v2/models/m/versions/AAA/infer", json=body(f"pinned {i}")))
                      for i in range(3)]
            await asyncio.wait_for(until_queued(3), 30)
            replica.model = new  # what reconfigure does once the new weights are loaded
            later = asyncio.create_task(client.post("/v2/models/m/infer", json=body("later")))
            await asyncio.wait_for(until_queued(4), 30)
            gone = await client.post("/v2/models/m/versions/AAA/infer", json=body("too late"))
            release.set()
            return [await t for t in (first, *pinned, later)], gone

    try:
        answers, gone = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        release.set()
    assert [(r.status_code, r.json().get("model_version")) for r in answers] == [(200, "AAA")] * 4 + [(200, "BBB")]
    assert passes == [("AAA", ["first"]), ("AAA", ["pinned 0", "pinned 1", "pinned 2"]), ("BBB", ["later"])]
    assert gone.status_code == 404 and "has no version 'AAA'" in gone.json()["error"]
    # Statistics are the answering model's: the swapped-out one counts what it answered.
    assert (old.stats.requests["success"]["count"], new.stats.requests["success"]["count"]) == (4, 1)


def _answer(handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    """Send ``body`` (JSON when it looks like it, else text) with ``status``."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json" if body.startswith(b"{") else "text/plain")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class _FlakyHandler(BaseHTTPRequestHandler):
    """Answers call i as ``script[i]`` says: "drop" (the connection, no answer), "slow" (a prediction
    after the client has given up), or a status code (200: a prediction; other: a body like the one
    Serve's proxy sends for a dead replica)."""

    calls: list = []
    script: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.calls.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        action = self.script[len(self.calls) - 1] if len(self.calls) <= len(self.script) else 200
        if action == "drop":
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if action == "slow":
            time.sleep(0.8)
            action = 200
        if action == 200:
            body = b'{"model_name": "m", "model_version": "v", "predictions": [{"label": "pos", "score": 0.9, "top_k": []}]}'
        elif action < 500:
            body = b'{"error": "too many inputs"}'
        else:
            body = b"Internal Server Error"
        try:
            _answer(self, action, body)
        except (BrokenPipeError, ConnectionResetError):  # a "slow" answer's client is gone
            pass

    def log_message(self, *args):
        pass


def test_print_config_is_a_serve_deploy_config_rays_schema_accepts(tmp_path):
    """`rayfine serve --print-config`: the file `serve deploy` / `serve run` (and a RayService) take."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from rayfine.checkpoints import save_checkpoint
    from rayfine.models import build_model
    from rayfine.serve.app import AppArgs

    cfg = load_config("resnet18_digits_tiny")
    labels = [str(d) for d in range(10)]
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(cfg, labels), cfg, labels, {"epoch": 1})
    rayfine = str(Path(sys.executable).parent / "rayfine")
    out = subprocess.run([rayfine, "serve", str(ckpt), "--print-config", "--name", "digits", "--port", "8123",
                          "--set", "serve.max_batch_size=32"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    config = ServeDeploySchema.model_validate(yaml.safe_load(out.stdout))  # Ray's own schema of the file
    assert (config.http_options.host, config.http_options.port) == ("127.0.0.1", 8123)  # loopback unless told
    (app,) = config.applications
    assert (app.name, app.import_path) == ("digits", "rayfine.serve.app:build_app")
    args = AppArgs.model_validate(app.args)
    assert Path(args.checkpoint) == ckpt.resolve() and args.serve == {"max_batch_size": 32, "port": 8123}
    (deployment,) = app.deployments
    assert deployment.name == "Classifier" and deployment.user_config["checkpoint"] == args.checkpoint


def test_client_retries_a_dropped_connection_or_a_5xx_once_and_reports_refusals():
    from rayfine.serve.client import ClientError, format_predictions, predict

    server = HTTPServer(("127.0.0.1", 0), _FlakyHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        for first in ("drop", 500, 503):  # a dead replica's request, an overloaded app
            _FlakyHandler.calls, _FlakyHandler.script = [], [first]
            result = predict(url, ["a fine film"], api_key="k")
            assert result["predictions"][0]["label"] == "pos"
            assert _FlakyHandler.calls == ["/predict", "/predict"], first  # failed once, retried once
        assert "a fine film\tpos\t0.9000" in format_predictions(["a fine film"], result)
        # A text longer than a file name may be (255 bytes) is a text, not an error.
        long_text = "a gripping film, " * 20
        _FlakyHandler.calls, _FlakyHandler.script = [], []
        assert predict(url, [long_text])["predictions"][0]["label"] == "pos"
        assert format_predictions([long_text], result).splitlines()[1].startswith(long_text[:37] + "...")
        # Only one retry; and a request refused for itself (4xx) is not sent again.
        _FlakyHandler.calls, _FlakyHandler.script = [], [500, 500]
        with pytest.raises(ClientError, match="500 from .*Internal Server Error"):
            predict(url, ["x"])
        assert len(_FlakyHandler.calls) == 2
        _FlakyHandler.calls, _FlakyHandler.script = [], [413]
        with pytest.raises(ClientError, match="413 from .*too many inputs"):
            predict(url, ["x"])
        assert len(_FlakyHandler.calls) == 1
        # No answer in time: retried once, then a ClientError (it was requests' ReadTimeout, a traceback).
        _FlakyHandler.calls, _FlakyHandler.script = [], ["slow", "slow"]
        with pytest.raises(ClientError, match=r"no answer from http://127.0.0.1:\d+/predict within 0.3 s \(tried 2 times\)"):
            predict(url, ["x"], timeout_s=0.3)
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(ClientError, match="cannot reach .* tried 2 times"):
        predict(f"http://127.0.0.1:{free}", ["x"])
    with pytest.raises(ClientError, match=f"give the server's URL with its scheme, e.g. http://127.0.0.1:{free}$"):
        predict(f"127.0.0.1:{free}", ["x"])


class _RecordingHandler(BaseHTTPRequestHandler):
    """Keeps each request's JSON body and answers one prediction per input."""

    bodies: list = []
    auth: ClassVar[list] = []  # each request's Authorization header (None: none)

    def do_POST(self):  # noqa: N802 (http.server's naming)
        import json

        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.bodies.append(body)
        self.auth.append(self.headers.get("Authorization"))
        answer = json.dumps({"model_name": "nli", "model_version": "v", "predictions": [
            {"label": "entailment", "score": 0.75, "top_k": [{"label": "entailment", "score": 0.75}]}
            for _ in body["inputs"]]}).encode()
        _answer(self, 200, answer)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _recording_server():
    """A stand-in /predict on a loopback port (its URL), recording into _RecordingHandler."""
    server = HTTPServer(("127.0.0.1", 0), _RecordingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _RecordingHandler.bodies, _RecordingHandler.auth = [], []
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_rayfine_predict_sends_text_pairs_with_pairs(capsys):
    """`rayfine predict --pairs A B C D` asks a text-pair model about [A, B] and [C, D], as
    /predict takes them (test_a_text_pair_model_answers_pairs_over_http serves such a request)."""
    from rayfine.cli import main

    with _recording_server() as url:
        assert main(["predict", url, "--pairs", "A man sleeps.", "A person rests.", "A dog runs.", "It sits."]) == 0
        assert _RecordingHandler.bodies == [{"inputs": [["A man sleeps.", "A person rests."], ["A dog runs.", "It sits."]],
                                             "top_k": 3}]
        lines = capsys.readouterr().out.splitlines()
        assert lines[1:] == ["A man sleeps. | A person rests.\tentailment\t0.7500", "A dog runs. | It sits.\tentailment\t0.7500"]
        assert main(["predict", url, "--pairs", "A man sleeps.", "A person rests.", "A dog runs."]) == 1
        assert "--pairs takes texts two at a time, a text and its pair; got 3 texts" in capsys.readouterr().err
        assert len(_RecordingHandler.bodies) == 1  # refused before sending


def test_rayfine_predict_names_a_missing_file_instead_of_sending_its_name_as_a_text(capsys, tmp_path, monkeypatch):
    """A mistyped photo.png (and no other file) was sent as the text "photo.png": an image model
    answered that it is not valid base64, naming no file. --texts sends any input as a text: a text
    model's one-word input that looks like a file name, or names one that exists."""
    from rayfine.cli import main

    with _recording_server() as url:
        assert main(["predict", url, "no/such/photo.JPG"]) == 1
        assert "no such file: no/such/photo.JPG" in capsys.readouterr().err
        assert _RecordingHandler.bodies == []  # refused before sending
        assert main(["predict", url, "a fine film", "see it.png twice"]) == 0  # texts with spaces are texts
        assert _RecordingHandler.bodies == [{"inputs": ["a fine film", "see it.png twice"], "top_k": 3}]
        monkeypatch.chdir(tmp_path)
        (tmp_path / "review.txt").write_text("a file's words, not sent")
        capsys.readouterr()
        assert main(["predict", url, "--texts", "photo.png", "review.txt"]) == 0
        assert _RecordingHandler.bodies[-1] == {"inputs": ["photo.png", "review.txt"], "top_k": 3}
        assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["photo.png", "review.txt"]


def test_predict_takes_every_image_file_name_the_readers_take_for_a_file():
    from rayfine.data.images import IMAGE_EXTENSIONS
    from rayfine.serve.client import FILE_SUFFIXES

    assert {f".{e}" for e in IMAGE_EXTENSIONS} <= set(FILE_SUFFIXES)


def test_rayfine_predict_strips_the_api_key_and_never_shows_it(capsys, monkeypatch):
    """The server strips its key (app.read_api_key); `rayfine predict` must send the same key from a
    RAYFINE_API_KEY that ends in a newline (a Kubernetes Secret of `echo key > file`), and a key no
    header can carry is refused without printing it (requests' own error quotes the header)."""
    from rayfine.cli import main
    from rayfine.serve.client import ClientError, call, predict

    with _recording_server() as url:
        monkeypatch.setenv("RAYFINE_API_KEY", "s3cret-key\n")
        assert predict(url, ["a fine film"])["model_name"] == "nli"
        monkeypatch.setenv("RAYFINE_API_KEY", " \n")  # blank: no key, as the server reads it
        predict(url, ["a fine film"])
        assert _RecordingHandler.auth == ["Bearer s3cret-key", None]
        for key in ("s3cret\nkey", "s3cret\rkey"):
            monkeypatch.setenv("RAYFINE_API_KEY", key)
            assert main(["predict", url, "a fine film"]) == 1
            err = capsys.readouterr().err
            assert "control character" in err and "s3cret" not in err, err
        with pytest.raises(ClientError, match="control character") as refused:
            predict(url, ["a fine film"], api_key="s3cret\x00key")
        assert "s3cret" not in str(refused.value)
        assert len(_RecordingHandler.bodies) == 2  # refused before sending
        # Whatever builds the header, call() never lets requests' message (or the codec's) through.
        for header in ("Bearer s3cret\nkey", "Bearer s3cret-\u043a\u043b\u044e\u0447"):
            with pytest.raises(ClientError, match="cannot be sent as HTTP") as refused:
                call("POST", url + "/predict", json={"inputs": ["x"]}, headers={"Authorization": header})
            assert "s3cret" not in str(refused.value) and refused.value.__cause__ is None
        assert len(_RecordingHandler.bodies) == 2


def test_a_replica_reloads_the_checkpoint_of_a_run_directory_when_its_user_config_changes(tmp_path):
    """A RayService names the run directory the pipeline writes again; rolling out new weights is a
    new user_config (its version changed) for the same directory: reconfigure must find the
    checkpoint in it (tune/best/checkpoint, as build_app's args do) and load what is there now."""
    import asyncio

    import torch

    from rayfine.checkpoints import save_checkpoint
    from rayfine.errors import CheckpointError
    from rayfine.models import build_model
    from rayfine.serve.app import Classifier
    from rayfine.serve.model import weights_version

    cfg = load_config("resnet18_digits_tiny")
    labels = [str(d) for d in range(10)]
    best = tmp_path / "run" / "tune" / "best" / "checkpoint"
    threads = torch.get_num_threads()
    try:
        replica = Classifier.func_or_class.__bases__[0]("digits", LIMITS.model_dump_json())
        torch.manual_seed(0)
        save_checkpoint(best, build_model(cfg, labels), cfg, labels, {"epoch": 1})
        first = weights_version(best)
        asyncio.run(replica.reconfigure({"checkpoint": str(tmp_path / "run"), "version": "rollout-1"}))
        assert (replica.model.path, replica.model.version) == (str(best.resolve()), first)
        torch.manual_seed(1)
        save_checkpoint(best, build_model(cfg, labels), cfg, labels, {"epoch": 2})  # a later run's winner
        asyncio.run(replica.reconfigure({"checkpoint": str(tmp_path / "run"), "version": "rollout-2"}))
        assert replica.model.version == weights_version(best) != first
        # A rollout to a path without a checkpoint: the model served before stays, and says why (raising
        # would make Serve stop this replica and start one that fails the same way).
        asyncio.run(replica.reconfigure({"checkpoint": str(tmp_path), "version": "rollout-3"}))
        assert replica.model.version == weights_version(best)
        failed = asyncio.run(replica.info())["swap_error"]
        assert failed["user_config"]["version"] == "rollout-3" and "holds no checkpoint" in failed["error"], failed
        asyncio.run(replica.reconfigure({"checkpoint": str(tmp_path / "run"), "version": "rollout-2"}))  # rolled back
        assert asyncio.run(replica.info())["swap_error"] is None
        # A replica's first model must load, or the replica does not start.
        fresh = Classifier.func_or_class.__bases__[0]("digits", LIMITS.model_dump_json())
        with pytest.raises(CheckpointError, match="holds no checkpoint"):
            asyncio.run(fresh.reconfigure({"checkpoint": str(tmp_path), "version": "rollout-3"}))
    finally:
        torch.set_num_threads(threads)


def test_a_replica_that_reserved_a_gpu_it_cannot_use_refuses_to_serve_on_the_cpu(tmp_path):
    """serve.gpus_per_replica > 0 means inference on CUDA; a replica whose torch sees no CUDA device
    (this CI machine; a CPU-only torch build on a GPU node) says so instead of serving on the CPU."""
    import torch

    from rayfine.checkpoints import save_checkpoint
    from rayfine.errors import RayfineError
    from rayfine.models import build_model
    from rayfine.serve.model import load_served

    cfg = load_config("resnet18_digits_tiny")
    labels = [str(d) for d in range(10)]
    ckpt = save_checkpoint(tmp_path / "ckpt", build_model(cfg, labels), cfg, labels, {"epoch": 1})
    if torch.cuda.is_available():
        assert load_served(ckpt, LIMITS.model_copy(update={"gpus_per_replica": 1.0})).device == "cuda"
    else:
        with pytest.raises(RayfineError, match="serve.gpus_per_replica is 1.0, but this replica's torch .* sees no CUDA"):
            load_served(ckpt, LIMITS.model_copy(update={"gpus_per_replica": 1.0}))
    assert load_served(ckpt, LIMITS).device == "cpu"


def test_a_deploy_that_never_starts_says_why_serve_holds_its_replicas(monkeypatch):
    """Replicas that wait for resources (serve.gpus_per_replica on a cluster without GPUs) keep the
    app DEPLOYING; the timeout names the reason Serve gives for the deployment, not the status alone."""
    import rayfine.serve.deploy as deploy_module

    waiting = ("Deployment 'Classifier' in application 'm' has 1 replicas that have taken more than 30s to be "
               "scheduled. Resources required for each replica: {\"CPU\": 1.0, \"GPU\": 1.0}, total resources "
               "available: {\"CPU\": 2.0}.")
    details = {"applications": {"m": {"status": "DEPLOYING", "deployments": {"Classifier": {"message": waiting}}}}}
    monkeypatch.setattr(deploy_module, "_details", lambda: details)
    with pytest.raises(deploy_module.DeployError) as info:
        deploy_module._wait_for_version("m", "abc", timeout_s=0.2)
    assert str(info.value) == f"app 'm' did not serve version abc within 0s (status DEPLOYING: {waiting})"


def test_replicas_the_cluster_cannot_hold_are_named_with_the_fields_to_change():
    """A new app starts num_replicas (or max(1, min_replicas) with autoscaling) replicas, each on
    one node: one bigger than every node, or more than fit in all, would leave Serve waiting."""
    from rayfine.serve.deploy import replica_fit_problems

    def problems(nodes, *overrides):
        return replica_fit_problems(load_config("resnet18_digits_tiny", list(overrides)).serve, nodes)

    two, four = {"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}
    assert problems([two]) == []  # one replica of 1 CPU
    assert problems([two], "serve.num_replicas=2") == []
    assert problems([two, two], "serve.cpus_per_replica=2", "serve.num_replicas=2") == []
    # 4 CPUs in all, but no node holds a replica of 3.
    (p,) = problems([two, two], "serve.cpus_per_replica=3")
    assert "needs 3 CPU(s)" in p and "the largest: 2 CPUs, 0 GPUs" in p and "serve.cpus_per_replica at most 2" in p
    (p,) = problems([two], "serve.gpus_per_replica=1")
    assert "needs 1 CPU(s) and 1 GPU(s)" in p and "serve.gpus_per_replica=0 (no node has a GPU)" in p
    assert problems([two, four], "serve.gpus_per_replica=1") == []
    (p,) = problems([two, four], "serve.gpus_per_replica=1", "serve.num_replicas=2")  # one GPU in all
    assert p == ("the app starts with 2 replicas (serve.num_replicas=2) of 1 CPU(s) and 1 GPU(s) each, but the "
                 "cluster fits 1; set serve.num_replicas to at most 1, or lower serve.gpus_per_replica")  # GPUs bind
    (p,) = problems([two], "serve.num_replicas=3")
    assert "(serve.num_replicas=3)" in p and "fits 2" in p and p.endswith("or lower serve.cpus_per_replica")
    # Ray places a fraction of a GPU on one GPU: two GPUs hold four replicas of 0.4 (two each), not five.
    two_gpus = {"CPU": 8.0, "GPU": 2.0}
    assert problems([two_gpus], "serve.gpus_per_replica=0.4", "serve.num_replicas=4") == []
    (p,) = problems([two_gpus], "serve.gpus_per_replica=0.4", "serve.num_replicas=5")
    assert "fits 4" in p and p.endswith("or lower serve.gpus_per_replica")
    assert problems([two_gpus], "serve.gpus_per_replica=0.25", "serve.num_replicas=8") == []
    # Autoscaling starts with min_replicas (at least one); max_replicas is only what it may grow to.
    assert problems([two], "serve.autoscaling=true", "serve.min_replicas=0", "serve.max_replicas=8") == []
    (p,) = problems([two], "serve.autoscaling=true", "serve.min_replicas=3", "serve.max_replicas=4")
    assert "(serve.min_replicas=3)" in p and "fits 2" in p
    assert problems([{"CPU": 1.0}], "serve.cpus_per_replica=0.5", "serve.num_replicas=2") == []


def test_a_new_app_the_cluster_cannot_hold_is_refused_on_an_embedded_ray_and_warned_about_on_a_cluster(
        fake_serve, monkeypatch):
    """`rayfine serve` / `run` on an embedded Ray (strict_resources): refused, nothing deployed, and
    `run` refuses before its search. On a cluster (which may add nodes): deployed, with a warning.
    A swap starts no replicas: not checked."""
    import rayfine.pipeline
    import rayfine.tune
    from rayfine.config import ConfigError

    ckpt = fake_serve.checkpoint(0.9)
    with pytest.raises(ConfigError, match=r"needs 4 CPU\(s\).*serve.cpus_per_replica at most 2"):
        fake_serve.module.deploy(ckpt, name="digits", serve_overrides={"cpus_per_replica": 4}, strict_resources=True,
                                 log=lambda *_: None)
    assert fake_serve.deployed == []
    searched, logged = [], []
    monkeypatch.setattr(rayfine.tune, "run_search", lambda *a, **k: searched.append(a))
    cfg = load_config("resnet18_digits_tiny", ["name=digits", "serve.num_replicas=3"])
    with pytest.raises(ConfigError, match=r"\(serve.num_replicas=3\).*fits 2"):
        rayfine.pipeline.run_pipeline(cfg, strict_resources=True, log=logged.append)
    assert searched == []  # refused before the search

    def started(schema):  # the replicas Serve started serve what the config names
        app = schema.applications[0]
        fake_serve.details["applications"]["digits"] = {
            "status": "RUNNING", "source": "declarative", "route_prefix": "/",
            "deployed_app_config": app.model_dump(mode="json", exclude_unset=True),
            "deployments": {"Classifier": {"replicas": [{"replica_id": "r1", "state": "RUNNING"}]}}}
        fake_serve.served.update(replica="r1", **app.deployments[0].user_config, metrics={"val_accuracy": 0.9})

    fake_serve.on_deploy = started
    result = fake_serve.module.deploy(ckpt, name="digits", serve_overrides={"cpus_per_replica": 4}, timeout_s=5,
                                      log=logged.append)
    assert result["action"] == "deployed" and len(fake_serve.deployed) == 1
    assert any(m.startswith("[warning] a serve replica needs 4 CPU(s)") and "scale up" in m for m in logged)
    # A swap into the live app starts no replicas: not checked (here no replica would fit anywhere).
    fake_serve.nodes = []
    swapped = fake_serve.module.deploy(fake_serve.checkpoint(0.95), name="digits", strict_resources=True, timeout_s=5,
                                       log=lambda *_: None)
    assert swapped["action"] == "swapped"


def test_batch_statistics_can_be_read_while_a_forward_pass_records_a_new_batch_size():
    """A pass records its batch (in the pass's thread) while a stats route may read (on the event
    loop): at any moment, every counted size has its times (was: a size counted first, and a read
    in between raised KeyError, a 500)."""
    from rayfine.serve.model import BatchStats

    stats = BatchStats()
    seen = []

    class ReadMidway(dict):  # a stats request arriving while record() fills in a new size's times
        def setdefault(self, key, default=None):
            seen.append(stats.batch_stats())
            return super().setdefault(key, default)

    stats.ns_by_size = ReadMidway()
    stats.record(3, (1, 2, 3))
    stats.record(3, (1, 2, 3))
    assert seen[0] == [] and seen[1][0]["batch_size"] == 3 and seen[1][0]["compute_infer"] == {"count": 1, "ns": 2}
    assert stats.batch_stats()[0]["compute_input"] == {"count": 2, "ns": 2}


def test_two_deploys_that_find_the_turns_holder_gone_take_it_one_at_a_time(monkeypatch):
    """Deploy b read the killed holder's turn, and before it deleted it, deploy a had deleted it and
    taken its own: b then deleted a's and took its own, and both applied their apps at once."""
    from ray.experimental import internal_kv

    from rayfine.serve import deploy as deploy_module

    kv, _ = fake_gcs_kv(monkeypatch)
    key = (deploy_module.DEPLOY_LOCK_NAMESPACE, deploy_module.DEPLOY_LOCK_KEY)
    kv[key] = b"gone-host:1:x:0.0"  # a holder killed long ago
    monkeypatch.setattr(deploy_module, "DEPLOY_LOCK_SETTLE_S", 0.3)
    b_read, a_holds, events = threading.Event(), threading.Event(), []
    get, put = internal_kv._internal_kv_get, internal_kv._internal_kv_put

    def slow_get(k, *, namespace=None):  # both read the gone holder's turn; b is slower to act on it
        value = get(k, namespace=namespace)
        if value == b"gone-host:1:x:0.0":
            if threading.current_thread().name == "a":
                b_read.wait(3)
            else:
                b_read.set()
                a_holds.wait(3)
        return value

    def noting_put(k, value, overwrite=True, *, namespace=None):
        held = put(k, value, overwrite, namespace=namespace)
        if threading.current_thread().name == "a" and not held:
            a_holds.set()
        return held

    monkeypatch.setattr(internal_kv, "_internal_kv_get", slow_get)
    monkeypatch.setattr(internal_kv, "_internal_kv_put", noting_put)

    def deploy():
        with deploy_module._deploy_lock(log=lambda *_: None, timeout_s=10):
            events.append(("in", threading.current_thread().name))
            time.sleep(0.5)
            events.append(("out", threading.current_thread().name))

    threads = [threading.Thread(target=deploy, name=name) for name in ("a", "b")]
    threads[0].start()
    threads[1].start()
    for thread in threads:
        thread.join(15)
    assert len(events) == 4 and events[0][1] == events[1][1] and events[2][1] == events[3][1], events  # one at a time
    assert kv == {}


def test_two_deploys_at_once_keep_both_apps(fake_serve, monkeypatch):
    """A declarative deploy replaces the whole set of apps: two rayfine deploys to one cluster at
    once (two `rayfine serve`s) each read the apps before the other's was applied, and the later
    one dropped the other's app. They take turns now, the second waiting (and saying so)."""
    ckpt = fake_serve.checkpoint(0.9)
    a_read, results, logs = threading.Event(), {}, {"a": [], "b": []}
    details = fake_serve.module._details

    def reading(*args):  # app a reads the apps, then waits until app b's deploy has asked for its turn
        import copy

        read = copy.deepcopy(details(*args))
        if threading.current_thread().name == "a" and not a_read.is_set():
            a_read.set()
            fake_serve.kv_refused.wait(3)  # without turns: b reads, applies and returns meanwhile
        return read

    def started(schema):  # the controller: the applied apps are what runs
        fake_serve.details["applications"] = {
            app.name: {"status": "RUNNING", "source": "declarative", "route_prefix": app.route_prefix,
                       "deployed_app_config": app.model_dump(mode="json", exclude_unset=True),
                       "deployments": {"Classifier": {"replicas": [{"replica_id": "r1", "state": "RUNNING"}]}}}
            for app in schema.applications}
        fake_serve.served.update(replica="r1", **schema.applications[-1].deployments[0].user_config,
                                 metrics={"val_accuracy": 0.9})

    monkeypatch.setattr(fake_serve.module, "_details", reading)
    fake_serve.on_deploy = started

    def deploy(name):
        results[name] = fake_serve.module.deploy(ckpt, name=name, serve_overrides={"route_prefix": f"/{name}"},
                                                 timeout_s=5, log=logs[name].append)

    first = threading.Thread(target=deploy, args=("a",), name="a")
    first.start()
    assert a_read.wait(5)
    second = threading.Thread(target=deploy, args=("b",), name="b")
    second.start()
    first.join(10)
    second.join(10)
    assert results["a"]["action"] == results["b"]["action"] == "deployed"
    assert sorted(fake_serve.details["applications"]) == ["a", "b"]  # was: ["b"], a's app dropped
    assert [[app.name for app in schema.applications] for schema in fake_serve.deployed] == [["a"], ["a", "b"]]
    assert "[serve] waiting for another rayfine deploy on this cluster to apply its apps" in logs["b"]
    assert fake_serve.kv == {}  # both let go of their turn


def test_a_swap_another_deploy_supersedes_while_it_waits_neither_waits_out_its_timeout_nor_rolls_back(fake_serve):
    """The deploy lock covers a deploy's read and apply, not its wait for the replicas: a second
    `rayfine serve` may swap in a third version meanwhile. The first then waited out its timeout
    and failed, or, if its replicas could not load its version, put its "before" back over the
    second's version: the app served neither new model while both commands had reported theirs."""
    from rayfine.serve.app import user_config

    old, new, third = fake_serve.checkpoint(0.9), fake_serve.checkpoint(0.95), fake_serve.checkpoint(0.97)
    app = fake_serve.live(old)
    fake_serve.served.update(version=user_config(old)["version"], checkpoint=str(old), metrics={"val_accuracy": 0.9})

    def another_deploy_right_after(schema):  # the config Serve holds once this apply and another's are in
        app["deployments"] = [{"name": "Classifier", "user_config": user_config(third)}]

    fake_serve.on_deploy = another_deploy_right_after
    started = time.monotonic()
    with pytest.raises(fake_serve.module.Superseded, match=rf"another deploy swapped version "
                                                           rf"{user_config(third)['version']} into 'digits'"):
        fake_serve.module.deploy(new, name="digits", timeout_s=30, log=lambda *_: None)
    assert time.monotonic() - started < 10
    # Its replicas could not load it, and another deploy applied its version just then: the config
    # is not put back over that one.
    fake_serve.deployed.clear()
    fake_serve.on_deploy = None
    app["deployments"] = [{"name": "Classifier", "user_config": user_config(old)}]

    def answers():
        yield dict(fake_serve.served)  # deploy's own look at the app
        another_deploy_right_after(None)
        yield {**fake_serve.served, "swap_error": {"user_config": user_config(new), "error": "OSError: no such file"}}

    fake_serve.answers = answers()
    with pytest.raises(fake_serve.module.DeployError, match=r"could not load .*; another deploy has since applied "
                                                            rf"version {user_config(third)['version']} to 'digits'"):
        fake_serve.module.deploy(new, name="digits", timeout_s=30, log=lambda *_: None)
    assert len(fake_serve.deployed) == 1  # its own swap only
