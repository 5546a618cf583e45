"""Serving an image model over real HTTP on 127.0.0.1 (ray tier): two ResNet-18 checkpoints (epochs 2
and 3 of conftest's digits_run, trained on real digits), a real Ray Serve app deployed as `rayfine
serve` deploys it, the Open Inference Protocol and /predict against the in-process model, dynamic
batching, a hot swap under load, --if-better, the bad-request table, the API key, autoscaling under
load, and the `rayfine serve` / `rayfine predict` CLI."""

from __future__ import annotations

import gzip
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from fault_tools import stop_session
from net_tools import b64, bomb_png, free_port, png, running_replicas, wait_for

from rayfine.checkpoints import load_checkpoint
from rayfine.data import Preprocessor
from rayfine.serve.model import weights_version

pytestmark = [pytest.mark.ray, pytest.mark.integration,
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # Ray Serve's own pydantic warnings

NAME = "digits"
KEY_ENV = "RAYFINE_TEST_SERVE_KEY"
KEY = "k-" + secrets.token_hex(12)
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = {"cpus_per_replica": 0.5, "max_batch_size": 8, "max_items": 8, "max_ongoing_requests": 16,
          "batch_wait_timeout_s": 0.05, "max_image_pixels": 10_000, "max_request_bytes": 256 * 1024,
          "image_formats": ["PNG", "JPEG", "BMP"], "api_key_env": KEY_ENV}
RAYFINE = str(Path(sys.executable).parent / "rayfine")


# --- fixtures: the key in the replicas' environment, two trained checkpoints, the app -------------

RAY_ENV = {KEY_ENV: KEY}  # set when Ray starts (conftest), so that its workers (the replicas) inherit it


@pytest.fixture(scope="module")
def checkpoints(ray_local, digits_run):
    """Two checkpoints of one real 3-epoch run (conftest's digits_run, which test_train checks):
    v1 is its epoch-2 checkpoint (as Ray Train stored it; the run keeps every epoch's), v2 the
    final one (the run's train/checkpoint); v2 validates better. Not epoch 1: that model (val accuracy 0.16-0.28) is
    close to a constant, and on another CPU's kernels it answered one class for every test digit."""
    stored = {json.loads((d / "metrics.json").read_text())["epoch"]: d for d in (digits_run.dir / "ray").glob("*/checkpoint_*") if d.is_dir()}
    out = {"v1": stored[2], "v2": digits_run.dir / "train" / "checkpoint"}
    assert json.loads((out["v2"] / "metrics.json").read_text())["epoch"] == 3
    metric = {t: json.loads((p / "metrics.json").read_text())["val_accuracy"] for t, p in out.items()}
    assert metric["v2"] > metric["v1"], metric  # what --if-better is tested on below
    return out


@pytest.fixture(scope="module")
def server(checkpoints):
    import ray
    from ray import serve

    from rayfine.serve.deploy import deploy

    result = deploy(checkpoints["v1"], name=NAME, serve_overrides={**LIMITS, "port": free_port()}, log=lambda *_: None)
    assert result["action"] == "deployed" and result["url"].startswith("http://127.0.0.1:")
    assert result["api_key"] is True  # the replicas read KEY_ENV (RAY_ENV) and say they hold a key
    yield SimpleNamespace(url=result["url"], v1=result["version"], v2=weights_version(checkpoints["v2"]))
    if ray.is_initialized():
        serve.shutdown()


@pytest.fixture(scope="module")
def digits_png(digits):
    images, labels = digits
    return [png(a) for a in images[-8:]], images[-8:], labels[-8:]


def get(server, path, **kw):
    return requests.get(server.url + path, headers=kw.pop("headers", AUTH), timeout=60, **kw)


def post(server, path, **kw):
    return requests.post(server.url + path, headers=kw.pop("headers", AUTH), timeout=60, **kw)


def reference(checkpoint_dir, items) -> tuple[np.ndarray, list[str]]:
    """The in-process model: load_checkpoint + the shared Preprocessor."""
    ckpt = load_checkpoint(checkpoint_dir)
    return ckpt.predict_proba(Preprocessor(ckpt.cfg, str(checkpoint_dir))(items)).numpy(), ckpt.labels


def v2_probs(body) -> np.ndarray:
    out = {o["name"]: o for o in body["outputs"]}
    return np.reshape(out["probabilities"]["data"], out["probabilities"]["shape"])


def stats(server) -> dict:
    r = get(server, f"/v2/models/{NAME}/stats")
    assert r.status_code == 200, r.text
    return r.json()["model_stats"][0]


# --- tests, in order: the swap in the middle changes what later ones see --------------------------


def test_health_metadata_and_openapi(server):
    assert requests.get(server.url + "/v2/health/live", timeout=30).json() == {"live": True}  # no key needed
    assert requests.get(server.url + "/v2/health/ready", timeout=30).json() == {"ready": True}
    assert get(server, f"/v2/models/{NAME}/ready").json() == {"name": NAME, "ready": True}
    # HEAD answers as GET does, without the body (health checkers and load balancers send it).
    head = requests.head(server.url + "/v2/health/ready", timeout=30)
    full = requests.get(server.url + "/v2/health/ready", timeout=30)
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == full.headers["content-length"] == str(len(full.content))
    assert requests.head(server.url + f"/v2/models/{NAME}", timeout=30).status_code == 401  # the key is still asked for
    assert requests.head(server.url + f"/v2/models/{NAME}", headers=AUTH, timeout=30).status_code == 200
    meta = get(server, f"/v2/models/{NAME}").json()
    assert meta == {
        "name": NAME, "versions": [server.v1], "platform": "pytorch",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                   {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 1]}],
        "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]}, {"name": "score", "datatype": "FP32", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert get(server, f"/v2/models/{NAME}/versions/{server.v1}").json() == meta
    assert get(server, "/v2").json()["name"] == "rayfine"
    schema = get(server, "/openapi.json").json()
    assert {"/v2/models/{name}/infer", "/predict", "/v2/health/ready"} <= set(schema["paths"])
    assert "InferenceRequest" in schema["components"]["schemas"]
    infer = schema["paths"]["/v2/models/{name}/infer"]["post"]
    both = {"application/json", "application/octet-stream"}  # JSON, or the binary tensor data extension
    assert set(infer["requestBody"]["content"]) == both and set(infer["responses"]["200"]["content"]) == both


def test_v2_and_predict_answer_like_the_in_process_model(server, checkpoints, digits_png):
    pngs, arrays, _ = digits_png
    expected, labels = reference(checkpoints["v1"], pngs)
    assert len(set(expected.argmax(1))) > 1  # a real model, not a constant

    r = post(server, f"/v2/models/{NAME}/infer",
             json={"id": "req-1", "inputs": [{"name": "image", "shape": [8], "datatype": "BYTES", "data": [b64(p) for p in pngs]}]})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Encoding"] == "gzip"  # requests asks for "gzip, deflate" and decodes the answer
    body = r.json()
    assert (body["id"], body["model_name"], body["model_version"]) == ("req-1", NAME, server.v1)
    out = {o["name"]: o for o in body["outputs"]}
    assert np.allclose(v2_probs(body), expected, atol=1e-5)
    assert out["label"]["data"] == [labels[i] for i in expected.argmax(1)]
    assert np.allclose(out["score"]["data"], expected.max(1), atol=1e-5)
    assert json.loads(out["probabilities"]["parameters"]["labels"]) == labels  # a parameter is a string

    # Decoded pixels (UINT8, nested; FP32 in [0, 1]) answer like the PNG files they came from.
    r = post(server, f"/v2/models/{NAME}/infer",
             json={"inputs": [{"name": "pixels", "shape": [8, 8, 8], "datatype": "UINT8", "data": arrays.tolist()}]})
    assert r.status_code == 200, r.text
    assert np.allclose(v2_probs(r.json()), expected, atol=1e-5)
    r = post(server, f"/v2/models/{NAME}/versions/{server.v1}/infer",
             json={"inputs": [{"name": "pixels", "shape": [8, 8, 8, 1], "datatype": "FP32",
                               "data": (arrays / 255.0).reshape(-1).tolist()}], "outputs": [{"name": "probabilities"}]})
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["probabilities"]
    assert np.allclose(v2_probs(r.json()), expected, atol=1e-5)

    # /predict: JSON with base64, and a multipart upload of the files.
    for r in (post(server, "/predict", json={"inputs": [b64(p) for p in pngs], "top_k": 3}),
              post(server, "/predict?top_k=3", files=[("files", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)])):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_version"] == server.v1 and body["model_name"] == NAME
        for row, p in zip(expected, body["predictions"]):
            order = np.argsort(-row)[:3]
            assert p["label"] == labels[order[0]] and p["score"] == pytest.approx(row[order[0]], abs=1e-5)
            assert [t["label"] for t in p["top_k"]] == [labels[i] for i in order]

    # Compressed request bodies (gzip; deflate in zlib's format or raw) reach the routes decoded.
    v2_body = json.dumps({"inputs": [{"name": "image", "shape": [8], "datatype": "BYTES", "data": [b64(p) for p in pngs]}]}).encode()
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    for coding, data in (("gzip", gzip.compress(v2_body)), ("deflate", zlib.compress(v2_body)),
                         ("deflate", raw.compress(v2_body) + raw.flush())):
        r = post(server, f"/v2/models/{NAME}/infer", data=data,
                 headers={**AUTH, "Content-Type": "application/json", "Content-Encoding": coding, "Accept-Encoding": "deflate"})
        assert r.status_code == 200, r.text
        assert r.headers["Content-Encoding"] == "deflate" and np.allclose(v2_probs(r.json()), expected, atol=1e-5)
    upload = requests.Request("POST", server.url + "/predict", files=[("files", (f"{i}.png", p)) for i, p in enumerate(pngs)]).prepare()
    r = post(server, "/predict", data=gzip.compress(upload.body),
             headers={**AUTH, "Content-Type": upload.headers["Content-Type"], "Content-Encoding": "gzip"})
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == [labels[i] for i in expected.argmax(1)]


def test_tritonclient_binary_and_json_tensors_answer_like_the_in_process_model(server, checkpoints, digits_png):
    """Triton's own HTTP client, as its users call it: JSON requests carry no Content-Type, and by
    default tensors and answers travel as binary data (the binary tensor data extension)."""
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    pngs, arrays, _ = digits_png
    expected, labels = reference(checkpoints["v1"], pngs)
    def auth() -> dict:  # a fresh dict each call: tritonclient adds its Inference-Header-Content-Length to it
        return dict(AUTH)

    client = tc.InferenceServerClient(server.url.removeprefix("http://"), connection_timeout=30, network_timeout=60)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(NAME, headers=auth())
        assert {"binary_tensor_data", "classification"} <= set(client.get_server_metadata(headers=auth())["extensions"])
        assert client.get_model_metadata(NAME, headers=auth())["versions"] == [server.v1]

        images = tc.InferInput("image", [len(pngs)], "BYTES")
        images.set_data_from_numpy(np.array(pngs, dtype=np.object_))  # binary_data=True: the files' bytes
        result = client.infer(NAME, [images], request_id="t-1", headers=auth())  # every output as binary data
        assert result.get_response()["id"] == "t-1" and result.get_response()["model_version"] == server.v1
        assert np.allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
        assert [x.decode() for x in result.as_numpy("label")] == [labels[i] for i in expected.argmax(1)]
        assert np.allclose(result.as_numpy("score"), expected.max(1), atol=1e-5)

        pixels = tc.InferInput("pixels", list(arrays.shape), "UINT8")
        pixels.set_data_from_numpy(arrays.astype(np.uint8), binary_data=True)
        result = client.infer(NAME, [pixels], outputs=[tc.InferRequestedOutput("label", binary_data=False),
                                                       tc.InferRequestedOutput("probabilities")], headers=auth())
        assert [o["name"] for o in result.get_response()["outputs"]] == ["label", "probabilities"]
        assert "data" in result.get_output("label") and "data" not in result.get_output("probabilities")
        assert np.allclose(result.as_numpy("probabilities"), expected, atol=1e-5)

        # The classification extension: each digit's 3 most probable classes, "value:index:label".
        result = client.infer(NAME, [pixels], outputs=[tc.InferRequestedOutput("probabilities", class_count=3)], headers=auth())
        top3 = [[x.decode().split(":") for x in row] for row in result.as_numpy("probabilities")]
        assert len(top3) == len(pngs) and all(len(row) == 3 for row in top3)
        for row, probs in zip(top3, expected):
            values, indices = [float(v) for v, _, _ in row], [int(i) for _, i, _ in row]
            assert indices[0] == probs.argmax() and values == sorted(values, reverse=True)
            assert [label for _, _, label in row] == [labels[i] for i in indices]
            assert np.allclose(values, probs[indices], atol=2e-5)  # printed with 6 decimals

        for sent, asked in (("gzip", "deflate"), ("deflate", "gzip")):  # tritonclient's compression options
            result = client.infer(NAME, [images], headers=auth(), request_compression_algorithm=sent,
                                  response_compression_algorithm=asked)
            assert np.allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
        model_stats = client.get_inference_statistics(NAME, headers=auth())["model_stats"][0]
        assert model_stats["inference_stats"]["success"]["count"] >= 4 and model_stats["version"] == server.v1

        images.set_data_from_numpy(np.array([b64(p) for p in pngs], dtype=np.object_), binary_data=False)  # JSON: base64
        result = client.infer(NAME, [images], outputs=[tc.InferRequestedOutput("probabilities", binary_data=False)], headers=auth())
        assert np.allclose(result.as_numpy("probabilities"), expected, atol=1e-5)

        images.set_data_from_numpy(np.array([b64(p).encode() for p in pngs], dtype=np.object_), binary_data=True)
        with pytest.raises(InferenceServerException, match="base64 text") as refused:
            client.infer(NAME, [images], headers=auth())
        assert refused.value.status() == "400"
        with pytest.raises(InferenceServerException, match="API key") as refused:
            client.infer(NAME, [pixels])
        assert refused.value.status() == "401"
    finally:
        client.close()


def test_concurrent_requests_are_batched(server, digits_png):
    pngs, _, _ = digits_png
    before = stats(server)
    codes = []

    def client(i):
        with requests.Session() as s:
            for j in range(8):
                r = s.post(server.url + "/predict", json={"inputs": [b64(pngs[(i + j) % 8])]}, headers=AUTH, timeout=60)
                codes.append(r.status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = stats(server)
    assert codes == [200] * 48
    assert after["inference_count"] - before["inference_count"] == 48
    sizes = Counter({b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]})
    sizes.subtract({b["batch_size"]: b["compute_infer"]["count"] for b in before["batch_stats"]})
    ran = {size: n for size, n in sizes.items() if n > 0}
    assert sum(size * n for size, n in ran.items()) == 48
    assert max(ran) > 1, ran  # the replica ran batches of several requests
    assert max(ran) <= LIMITS["max_batch_size"]
    print(f"\nbatch sizes under 6 concurrent clients: {dict(sorted(ran.items()))}")

    # Triton's statistics extension, every field of its schema: per request, each of the 48 was
    # answered, waited once and ran in one pass; its time covers its wait and its pass.
    per_request = after["inference_stats"]
    assert set(per_request) == {"success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit"}
    grew = {k: {f: per_request[k][f] - before["inference_stats"][k][f] for f in ("count", "ns")} for k in per_request}
    assert {k: v["count"] for k, v in grew.items()} == {"success": 48, "fail": 0, "queue": 48, "compute_input": 48,
                                                        "compute_infer": 48, "compute_output": 48, "cache_hit": 0}
    phases = ("compute_input", "compute_infer", "compute_output")
    assert grew["success"]["ns"] >= grew["queue"]["ns"] + sum(grew[k]["ns"] for k in phases) > 0
    assert all(b[k]["count"] == b["compute_infer"]["count"] and b[k]["ns"] > 0 for b in after["batch_stats"] for k in phases)
    for path in ("/v2/models/stats", f"/v2/models/{NAME}/versions/{after['version']}/stats"):
        r = get(server, path)
        assert r.status_code == 200 and r.json()["model_stats"][0]["inference_count"] == after["inference_count"], r.text
    r = get(server, f"/v2/models/{NAME}/versions/nope/stats")
    assert r.status_code == 404 and "has no version 'nope'" in r.json()["error"]


def _bad_requests(server):
    """(what, method, path, requests kwargs, status, part of the error message)."""
    noise = png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    big = png(np.zeros((120, 120), np.uint8))  # 14,400 pixels > max_image_pixels 10,000
    infer = f"/v2/models/{NAME}/infer"

    def v2(name="image", shape=(1,), datatype="BYTES", data=None):
        return {"json": {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]}}

    one = [b64(noise)]
    return [
        ("corrupt image", "POST", "/predict", {"json": {"inputs": [b64(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)]}}, 400,
         "not a readable image"),
        ("truncated image", "POST", infer, v2(data=[b64(noise[: len(noise) // 2])]), 400, "corrupt image data"),
        ("image over the pixel limit", "POST", "/predict", {"json": {"inputs": [b64(big)]}}, 400, "more than the limit of 10000"),
        ("decompression bomb", "POST", "/predict", {"json": {"inputs": [b64(bomb_png(40_000, 40_000))]}}, 400, "too large"),
        ("pixels over the limit", "POST", infer, v2("pixels", (1, 101, 100), "UINT8", [0] * 10100), 400, "exceed the limit of 10000"),
        ("refused image format", "POST", "/predict", {"json": {"inputs": [b64(png(np.zeros((8, 8), np.uint8), "GIF"))]}}, 415,
         "image format GIF is not accepted"),
        ("multipart to infer", "POST", infer, {"files": {"f": ("a.json", b"{}")}, "headers": AUTH}, 415,
         "Content-Type must be application/json"),
        ("text/plain to infer, read as JSON as Triton reads it", "POST", infer,
         {"data": "hello", "headers": {**AUTH, "Content-Type": "text/plain"}}, 400, "malformed JSON"),
        ("wrong content type (predict)", "POST", "/predict", {"data": "<x/>", "headers": {**AUTH, "Content-Type": "application/xml"}},
         415, "application/json or multipart/form-data"),
        ("malformed JSON", "POST", infer, {"data": '{"inputs": [', "headers": {**AUTH, "Content-Type": "application/json"}}, 400,
         "malformed JSON body"),
        ("truncated gzip body", "POST", infer, {"data": gzip.compress(b'{"inputs": []}')[:-6], "headers": {**AUTH, "Content-Encoding": "gzip"}},
         400, "the body ends before its gzip data does"),
        ("corrupt deflate body", "POST", "/predict", {"data": b"\x78\x9c not deflate", "headers": {**AUTH, "Content-Type": "application/json",
                                                                                            "Content-Encoding": "deflate"}},
         400, "not valid deflate data"),
        ("gzip bomb", "POST", infer, {"data": gzip.compress(b" " * 1_000_000), "headers": {**AUTH, "Content-Encoding": "gzip"}},
         413, "decompressed request body exceeds the limit of 262144"),
        ("unknown Content-Encoding", "POST", infer, {"data": b"{}", "headers": {**AUTH, "Content-Encoding": "br"}}, 415,
         "Content-Encoding br is not accepted; accepted: gzip, deflate"),
        ("binary header past the body", "POST", infer,
         {"data": b'{"inputs": []}', "headers": {**AUTH, "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "99"}},
         400, "Inference-Header-Content-Length 99 does not fit the body of 14 bytes"),
        ("binary data size past the body", "POST", infer,
         {"data": b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}]}\x01\x00\x00\x00x',
          "headers": {**AUTH, "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "105"}},
         400, "binary_data_size is 9, but 5 bytes follow"),
        ("JSON that is not an object", "POST", "/predict", {"json": [1, 2]}, 400, "body"),
        ("wrong tensor shape", "POST", infer, v2("pixels", (1, 8, 8), "UINT8", [0] * 60), 400, "needs 64 elements"),
        ("wrong tensor datatype", "POST", infer, v2("pixels", (1, 8, 8), "INT64", [0] * 64), 400, "UINT8 (0-255) or FP32"),
        ("unknown datatype", "POST", infer, v2("image", (1,), "STRING", one), 400, "inputs.0.datatype"),
        ("BYTES that are not base64", "POST", infer, v2(data=["not base64!"]), 400, "not valid base64"),
        ("input for a text model", "POST", infer, v2("text", (1,), "BYTES", ["a fine film"]), 400, "unknown input 'text'"),
        ("empty inputs (predict)", "POST", "/predict", {"json": {"inputs": []}}, 400, "no inputs"),
        ("empty inputs (v2)", "POST", infer, {"json": {"inputs": []}}, 400, "no inputs"),
        ("empty tensor", "POST", infer, v2(shape=(0,), data=[]), 400, "no inputs"),
        ("empty multipart", "POST", "/predict", {"files": {"inputs": (None, "")}}, 400, "takes uploaded files, not text fields"),
        ("too many items", "POST", "/predict", {"json": {"inputs": one * 9}}, 400, "too many items: 9"),
        ("body over the size limit", "POST", "/predict", {"json": {"inputs": ["A" * 300_000]}}, 413, "exceeds the limit of 262144"),
        ("chunked body over the limit", "POST", "/predict",
         {"data": (b"x" * 65536 for _ in range(6)), "headers": {**AUTH, "Content-Type": "application/json"}}, 413, "exceeds the limit"),
        ("unknown output", "POST", infer, {"json": {**v2(data=one)["json"], "outputs": [{"name": "logits"}]}}, 400, "unknown output"),
        ("bad top_k", "POST", "/predict?top_k=0", {"json": {"inputs": one}}, 400, "top_k"),
        ("unknown model name", "POST", "/v2/models/cats/infer", v2(data=one), 404, "unknown model 'cats'"),
        ("unknown model (metadata)", "GET", "/v2/models/cats", {}, 404, "unknown model 'cats'"),
        ("unknown version", "POST", f"/v2/models/{NAME}/versions/nope/infer", v2(data=one), 404, "has no version 'nope'"),
        ("missing API key", "POST", "/predict", {"json": {"inputs": one}, "headers": {}}, 401, "missing API key"),
        ("wrong API key", "POST", "/predict", {"json": {"inputs": one}, "headers": {"Authorization": "Bearer wrong"}}, 401,
         "invalid API key"),
        ("wrong X-API-Key", "GET", f"/v2/models/{NAME}", {"headers": {"X-API-Key": "wrong"}}, 401, "invalid API key"),
        ("no key for the model list's stats", "GET", "/v2/models/stats", {"headers": {}}, 401, "missing API key"),
        ("unknown route", "GET", "/v3/anything", {}, 404, "no such route"),
        ("wrong method", "GET", "/predict", {}, 405, "Method Not Allowed"),
    ]


def test_bad_requests_get_a_4xx_with_the_reason_and_the_server_keeps_serving(server, digits_png):
    pngs, _, _ = digits_png
    replica = stats(server)["replica"]
    failures = []
    for what, method, path, kwargs, status, message in _bad_requests(server):
        kwargs = dict(kwargs)
        headers = kwargs.pop("headers", AUTH)
        r = requests.request(method, server.url + path, headers=headers, timeout=60, **kwargs)
        try:
            error = r.json().get("error", "")
        except ValueError:
            error = f"(not JSON) {r.text[:100]}"
        if r.status_code != status or message not in error:
            failures.append(f"{what}: got {r.status_code} {error!r}, wanted {status} with {message!r}")
    assert not failures, "\n".join(failures)
    # Still serving, on the same replica (nothing crashed it).
    r = post(server, "/predict", json={"inputs": [b64(pngs[0])]})
    assert r.status_code == 200 and stats(server)["replica"] == replica


def test_a_bad_request_in_a_batch_does_not_fail_the_others(server, digits_png):
    pngs, _, _ = digits_png
    good_answer = post(server, "/predict", json={"inputs": [b64(pngs[1])]}).json()["predictions"][0]["label"]
    before = stats(server)
    results = []

    def client(bad: bool):
        payload = [b64(b"\x89PNG\r\n\x1a\nbroken")] if bad else [b64(pngs[1])]
        for _ in range(6):
            r = requests.post(server.url + "/predict", json={"inputs": payload}, headers=AUTH, timeout=60)
            results.append((bad, r.status_code, r.json()))

    threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(code == 400 and "not a readable image" in body["error"] for bad, code, body in results if bad)
    assert all(code == 200 and body["predictions"][0]["label"] == good_answer for bad, code, body in results if not bad)
    after = stats(server)
    assert after["inference_count"] - before["inference_count"] == 18  # only the good items reached the model
    grew = {k: after["inference_stats"][k]["count"] - before["inference_stats"][k]["count"] for k in ("success", "fail")}
    assert grew == {"success": 18, "fail": 18}  # statistics count the refused requests as failed


def test_hot_swap_under_load_fails_nothing_and_changes_the_version(server, checkpoints, digits_png):
    from rayfine.serve.deploy import deploy

    pngs, _, _ = digits_png
    replica = stats(server)["replica"]
    swapped = threading.Event()
    seen: list[tuple[int, str, bool]] = []  # (status, version, sent after the swap returned)
    errors: list[str] = []  # a request that raised (no reply, a reply that is not JSON)
    finished: list[int] = []  # clients that got their 5 replies after the swap

    def client(i):
        try:
            with requests.Session() as s:
                after = 0
                for _ in range(400):  # bounded, whatever happens
                    done = swapped.is_set()
                    r = s.post(server.url + "/predict", json={"inputs": [b64(pngs[i])]}, headers=AUTH, timeout=60)
                    seen.append((r.status_code, r.json().get("model_version", r.text), done))
                    after += done
                    if after >= 5:
                        finished.append(i)
                        return
        except Exception as e:  # noqa: BLE001  (counted as a failure, not lost with the thread)
            errors.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    while len(seen) < 10 and not errors:
        time.sleep(0.05)
    result = deploy(checkpoints["v2"], name=NAME, if_better=True, log=lambda *_: None)
    swapped.set()
    for t in threads:
        t.join()

    assert result["action"] == "swapped" and result["version"] == server.v2 and "val_accuracy" in result["reason"]
    assert errors == [] and sorted(finished) == [0, 1, 2]
    assert [s for s in seen if s[0] != 200] == []
    versions = [v for _, v, _ in seen]
    assert set(versions) == {server.v1, server.v2}  # answered by both, nothing else
    assert all(v == server.v2 for _, v, after in seen if after)
    assert get(server, f"/v2/models/{NAME}").json()["versions"] == [server.v2]
    assert stats(server)["replica"] == replica  # swapped in place: the same replica, not a new one
    # The new model answers like the in-process v2 model.
    expected, _ = reference(checkpoints["v2"], pngs)
    r = post(server, f"/v2/models/{NAME}/infer",
             json={"inputs": [{"name": "image", "shape": [8], "datatype": "BYTES", "data": [b64(p) for p in pngs]}]})
    assert r.json()["model_version"] == server.v2
    assert np.allclose(v2_probs(r.json()), expected, atol=1e-5)
    print(f"\nhot swap under load: {len(seen)} requests, {versions.count(server.v1)} by v1, {versions.count(server.v2)} by v2")


def _serving(server, checkpoints, which: str) -> None:
    """Swaps checkpoint ``which`` ("v1" or "v2") in unless it is already served: in module order the
    tests before have left it there (a no-op); a test run alone (-k) gets the state it needs."""
    from rayfine.serve.deploy import deploy

    if get(server, f"/v2/models/{NAME}").json()["versions"] != [getattr(server, which)]:
        assert deploy(checkpoints[which], name=NAME, log=lambda *_: None)["action"] == "swapped"


def _cli(*args, env=None, timeout=180):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([RAYFINE, *args], capture_output=True, text=True, timeout=timeout, env=full_env)


def test_if_better_keeps_the_better_served_model(server, checkpoints):
    import ray

    from rayfine.serve.deploy import deploy

    _serving(server, checkpoints, "v2")  # the hot swap's
    result = deploy(checkpoints["v1"], name=NAME, if_better=True, log=lambda *_: None)
    assert result["action"] == "kept" and result["version"] == server.v2
    assert "<=" in result["reason"]
    # The same through the CLI, from another process joining this Ray (token auth is on).
    out = _cli("serve", str(checkpoints["v1"]), "--name", NAME, "--if-better",
               "--address", ray.get_runtime_context().gcs_address, env={"RAY_AUTH_MODE": "token"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"kept version {server.v2} of {NAME}" in out.stdout
    assert get(server, f"/v2/models/{NAME}").json()["versions"] == [server.v2]
    # Without --if-better the CLI swaps whatever it is given, and returns (the app keeps running).
    out = _cli("serve", str(checkpoints["v1"]), "--name", NAME, "--address", ray.get_runtime_context().gcs_address,
               env={"RAY_AUTH_MODE": "token"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{NAME} swapped: version {server.v1}" in out.stdout
    assert get(server, f"/v2/models/{NAME}").json()["versions"] == [server.v1]


def test_rayfine_predict_prints_labels_and_scores(server, checkpoints, digits_png, tmp_path):
    _serving(server, checkpoints, "v1")  # swapped back by the CLI in the test above
    pngs, _, _ = digits_png
    files = []
    for i, p in enumerate(pngs[:3]):
        files.append(tmp_path / f"digit{i}.png")
        files[-1].write_bytes(p)
    expected = post(server, "/predict", json={"inputs": [b64(p) for p in pngs[:3]]}).json()["predictions"]
    out = _cli("predict", server.url, *map(str, files), env={"RAYFINE_API_KEY": KEY})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == f"# model {NAME} version {server.v1}"
    for line, f, p in zip(lines[1:], files, expected):
        name, label, score = line.split("\t")[:3]
        assert (name, label) == (f.name, p["label"]) and float(score) == pytest.approx(p["score"], abs=1e-4)
    refused = _cli("predict", server.url, str(files[0]))  # no key
    assert refused.returncode == 1 and "401" in refused.stderr and "missing API key" in refused.stderr
    texts = _cli("predict", server.url, "not", "images", env={"RAYFINE_API_KEY": KEY})
    assert texts.returncode == 1 and "not valid base64" in texts.stderr


def test_the_printed_curl_command_answers_with_the_key_where_the_app_reads_it(server, digits_png, tmp_path, monkeypatch):
    """`rayfine run` prints a curl command: pasted into a shell, it must pass the app's API key
    check wherever the key comes from (serve.api_key_env is not RAYFINE_API_KEY here; a file)."""
    from rayfine.cli import curl_example
    from rayfine.config import ServeConfig

    (tmp_path / "image.png").write_bytes(digits_png[0][0])
    expected = post(server, "/predict?top_k=3", json={"inputs": [b64(digits_png[0][0])]}).json()["predictions"]
    key_file = tmp_path / "api key"
    key_file.write_text(KEY + "\n")
    monkeypatch.setenv(KEY_ENV, KEY)  # the driver's environment, which an embedded Ray's replicas inherit
    monkeypatch.setenv("HOME", str(tmp_path))  # a key file under ~, which the shell does not expand in quotes
    for settings in (ServeConfig(api_key_env=KEY_ENV), ServeConfig(api_key_env=KEY_ENV, api_key_file=str(key_file)),
                     ServeConfig(api_key_env=KEY_ENV, api_key_file="~/api key")):
        command = curl_example(server.url, "image", settings)
        assert KEY not in command  # the shell reads the key; the console never shows it
        out = subprocess.run(["bash", "-c", command], check=False, cwd=tmp_path, env={**os.environ, KEY_ENV: KEY},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout).get("predictions") == expected, (command, out.stdout)
    # No key anywhere: no header, and the request is refused as the app refuses it.
    command = curl_example(server.url, "image", ServeConfig(api_key_env="RAYFINE_TEST_UNSET_KEY"))
    assert "Authorization" not in command
    out = subprocess.run(["bash", "-c", command], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout)["error"].startswith("missing API key"), out.stdout


def test_a_swap_checks_serve_settings_against_the_running_replicas_not_the_first_checkpoint(server, checkpoints,
                                                                                            tmp_path):
    """A swap changes the app's user_config only, so its args keep naming the checkpoint it was
    first deployed from. A swap with serve overrides is checked against the settings the replicas
    run with: it works when that first checkpoint is gone, and a changed setting is named."""
    import shutil

    from ray import serve

    from rayfine.serve.deploy import DeployError, deploy

    app = "settings"
    port = int(server.url.rsplit(":", 1)[1])
    overrides = {**LIMITS, "port": port, "route_prefix": "/settings"}
    first = tmp_path / "first"
    shutil.copytree(checkpoints["v1"], first)
    try:
        assert deploy(first, name=app, serve_overrides=overrides, log=lambda *_: None)["action"] == "deployed"
        shutil.rmtree(first)  # the app's args still name it
        result = deploy(checkpoints["v2"], name=app, serve_overrides=overrides, log=lambda *_: None)
        assert (result["action"], result["version"]) == ("swapped", server.v2)
        with pytest.raises(DeployError, match=r"other serve settings \(serve.batch_wait_timeout_s 0.05 -> 0.02\)"):
            deploy(checkpoints["v1"], name=app, serve_overrides={**overrides, "batch_wait_timeout_s": 0.02},
                   log=lambda *_: None)
        r = requests.get(f"{server.url}/settings/v2/models/{app}", headers=AUTH, timeout=60)
        assert r.json()["versions"] == [server.v2], r.text
    finally:
        serve.delete(app)


def test_a_swap_to_another_label_set_is_refused_and_the_app_keeps_answering(server, checkpoints, digits_png, tmp_path):
    """The replicas say what their clients depend on (info(): kind, pairs, labels). The served
    weights under other label names (the same version: the weights' hash) are refused before
    anything is applied, --if-better or not, and the app keeps answering with its own labels."""
    import shutil

    from rayfine.serve.deploy import DeployError, deploy

    _serving(server, checkpoints, "v1")
    renamed = tmp_path / "renamed"
    shutil.copytree(checkpoints["v1"], renamed)
    labels = json.loads((renamed / "labels.json").read_text())
    (renamed / "labels.json").write_text(json.dumps([f"digit {x}" for x in labels]))
    for if_better in (False, True):
        with pytest.raises(DeployError, match=rf"app '{NAME}' serves another task \(labels: 10 -> 10 \('0', .* only "
                                              r"served now; 'digit 0', .* only new\)\): a hot swap keeps"):
            deploy(renamed, name=NAME, if_better=if_better, log=lambda *_: None)
    r = post(server, "/predict", json={"inputs": [b64(p) for p in digits_png[0][:2]]})
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == server.v1
    assert {p["label"] for p in r.json()["predictions"]} <= set(labels), r.text


def test_a_rollout_the_replicas_cannot_load_leaves_the_served_model_answering(server, checkpoints, digits_png,
                                                                              tmp_path, monkeypatch):
    """Serve stops a replica whose reconfigure raises and starts one with the new user_config: a
    rollout naming a checkpoint the replicas cannot load would take the app down. The replica keeps
    its model and says why; a client sending requests throughout sees only answers of that model.
    (1) a config applied as `serve deploy` or a RayService applies it, naming a directory without a
    checkpoint; (2) `deploy` of weights the replicas cannot read, which it rolls back."""
    import copy
    import shutil

    import rayfine.checkpoints
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from rayfine.serve.deploy import DeployError, _details, deploy, served_info

    pngs, _, _ = digits_png
    (before,) = get(server, f"/v2/models/{NAME}").json()["versions"]
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def client():
        with requests.Session() as session:
            while not stop.is_set():
                r = session.post(server.url + "/predict", json={"inputs": [b64(pngs[0])]}, headers=AUTH, timeout=60)
                seen.append((r.status_code, r.json().get("model_version", r.text)))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        app = _details()["applications"][NAME]["deployed_app_config"]
        typo = copy.deepcopy(app)
        typo["deployments"][0]["user_config"] = {"checkpoint": str(tmp_path / "missing"), "version": "typo"}
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [typo]}))
        def swap_error(version):
            error = served_info(NAME).get("swap_error") or {}
            return error if error.get("user_config", {}).get("version") == version else None

        failed = wait_for(lambda: swap_error("typo"), timeout_s=60, what="the replica's swap_error")
        assert "holds no checkpoint" in failed["error"], failed
        time.sleep(2)  # Serve would be replacing the replica by now
        assert _details()["applications"][NAME]["status"] == "RUNNING"

        # Weights cut short: the replicas cannot load them. Only the driver's own check (which would
        # refuse them too) is given the real checkpoint, as for a path only the driver can read.
        broken = tmp_path / "broken"
        shutil.copytree(checkpoints["v2"] if before == server.v1 else checkpoints["v1"], broken)
        weights = (broken / "model.safetensors").read_bytes()
        (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
        real = rayfine.checkpoints.load_checkpoint
        monkeypatch.setattr(rayfine.checkpoints, "load_checkpoint",
                            lambda d, *a, **k: real(checkpoints["v2"], *a, **k) if Path(d) == broken.resolve()
                            else real(d, *a, **k))
        with pytest.raises(DeployError, match=rf"replicas could not load {broken.resolve()}: .*; '{NAME}' keeps "
                                              rf"serving version {before}"):
            deploy(broken, name=NAME, log=lambda *_: None)
        rolled_back = _details()["applications"][NAME]["deployed_app_config"]["deployments"][0]["user_config"]
        assert rolled_back["version"] == before, rolled_back
        wait_for(lambda: served_info(NAME)["swap_error"] is None, timeout_s=60, what="the rollback's reconfigure")
        count = len(seen)
        wait_for(lambda: len(seen) >= count + 5, timeout_s=60, what="5 more answers")
    finally:
        stop.set()
        thread.join()
    assert seen and set(seen) == {(200, before)}, Counter(seen)
    assert get(server, f"/v2/models/{NAME}").json()["versions"] == [before]
    print(f"\nfailed rollouts under load: {len(seen)} requests, all answered by version {before}")


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(server, checkpoints, digits_png):
    """A second app with serve.autoscaling and short Serve delays from the serve: section: under
    load a second replica starts and answers requests; when the load stops it goes; no request fails."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from rayfine.serve.deploy import deploy

    pngs, _, _ = digits_png
    app = "auto"
    scaling = {"autoscaling": True, "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
               "upscale_delay_s": 0.0, "downscale_delay_s": 2.0, "look_back_period_s": 11.0}
    port = int(server.url.rsplit(":", 1)[1])
    result = deploy(checkpoints["v2"], name=app, log=lambda *_: None,
                    serve_overrides={**LIMITS, **scaling, "port": port, "route_prefix": "/auto"})
    url = result["url"]
    assert url == f"http://127.0.0.1:{port}/auto"

    def seconds_until(replicas: int) -> float:
        start = time.monotonic()
        wait_for(lambda: running_replicas(app) == replicas, 180, 0.5, f"{replicas} running replica(s)")
        return time.monotonic() - start

    threads = []
    stop = threading.Event()
    codes: list[int | str] = []  # status codes, or the error of a request that got none

    def client(i):
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    codes.append(s.post(url + "/predict", json={"inputs": [b64(pngs[i])]}, headers=AUTH,
                                        timeout=60).status_code)
                except requests.RequestException as e:
                    codes.append(type(e).__name__)

    try:
        details = _get_global_client().get_serve_details()["applications"][app]["deployments"]["Classifier"]
        config = details["deployment_config"]["autoscaling_config"]
        assert {k: config[k] for k in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s")} == {
            k: scaling[k] for k in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s")}
        assert running_replicas(app) == 1
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]  # 4x one replica's target
        for t in threads:
            t.start()
        up_s = seconds_until(2)
        # Both replicas answer: each one's statistics count the requests it ran.
        served_by: dict[str, int] = {}
        for _ in range(60):
            s = requests.get(f"{url}/v2/models/{app}/stats", headers=AUTH, timeout=60).json()["model_stats"][0]
            served_by[s["replica"]] = s["inference_count"]
            if len(served_by) == 2 and min(served_by.values()) > 0:
                break
            time.sleep(0.2)
        assert len(served_by) == 2 and min(served_by.values()) > 0, served_by
        stop.set()
        for t in threads:
            t.join()
        down_s = seconds_until(1)
        assert codes and set(codes) == {200}, Counter(codes)
        assert requests.post(url + "/predict", json={"inputs": [b64(pngs[0])]}, headers=AUTH,
                             timeout=60).status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join()
        serve.delete(app)
    print(f"\nautoscaling: 2 replicas {up_s:.0f} s after the load began, 1 again {down_s:.0f} s after it ended; "
          f"{len(codes)} requests, all 200")


def test_rayfine_serve_serves_until_interrupted(checkpoints, digits_png, tmp_path):
    """`rayfine serve RUN_DIR` on its own embedded Ray: serves, then stops cleanly on Ctrl-C.
    This module's Ray is stopped first: one Ray at a time on a small machine."""
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    pngs, _, _ = digits_png
    port = free_port()
    env = {**os.environ, "RAYFINE_API_KEY": "cli-key", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    # Replicas the embedded Ray cannot hold are refused at once (exit 2), not waited for until the
    # deploy times out; the field to change is named.
    refused = subprocess.Popen([RAYFINE, "serve", str(checkpoints["v2"].parent.parent), "--port", str(port),
                                "--set", "serve.cpus_per_replica=64"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)
    try:
        out, err = refused.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        stop_session(refused.pid, grace_s=0)
        raise
    assert refused.returncode == 2, (out + err)[-3000:]
    assert "a serve replica needs 64 CPU(s)" in err and "set serve.cpus_per_replica at most" in err, err[-3000:]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([RAYFINE, "serve", str(checkpoints["v2"].parent.parent), "--port", str(port),
                                 "--set", "serve.cpus_per_replica=0.5"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # its embedded Ray's processes join its session
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and "serving until Ctrl-C" not in log.read_text():
            time.sleep(1)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert requests.get(url + "/v2/health/ready", timeout=30).json() == {"ready": True}
        r = requests.post(url + "/predict", json={"inputs": [b64(pngs[0])]}, headers={"X-API-Key": "cli-key"}, timeout=60)
        assert r.status_code == 200 and r.json()["model_name"] == "digits", r.text  # the experiment's name
        assert requests.post(url + "/predict", json={"inputs": [b64(pngs[0])]}, timeout=60).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            stop_session(proc.pid, grace_s=0)  # the command and what it started
            raise
    assert code == 0, log.read_text()[-3000:]
    assert "stopping digits" in log.read_text()
    assert "[serve] the API asks for its key" in log.read_text()  # RAYFINE_API_KEY, read by the replicas
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=5)
