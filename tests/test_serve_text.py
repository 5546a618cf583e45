"""Serving a text model over real HTTP on 127.0.0.1 (ray tier): MiniLM fine-tuned on real Rotten
Tomatoes snippets (conftest's reviews_run), served with autoscaling and an API key from a file; the
Open Inference Protocol and /predict against the in-process model, text limits and bad requests,
`rayfine predict`."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from net_tools import free_port

from rayfine.checkpoints import load_checkpoint
from rayfine.data import Preprocessor

pytestmark = [pytest.mark.ray, pytest.mark.integration,
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # Ray Serve's own pydantic warnings

NAME = "reviews"
KEY = "t-" + secrets.token_hex(12)
AUTH = {"X-API-Key": KEY}
TEXTS = ["A moving, beautifully acted and utterly delightful film.", "A dull, lifeless and tedious mess.",
         "The plot is thin but the performances carry it.", "I wanted my two hours back."]
RAYFINE = str(Path(sys.executable).parent / "rayfine")


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("secrets") / "api_key"
    path.write_text(KEY + "\n")
    return path


@pytest.fixture(scope="module")
def checkpoint(ray_local, reviews_run):
    """MiniLM fine-tuned on a CSV of real reviews (conftest's reviews_run, which test_text checks)."""
    return reviews_run.checkpoint


@pytest.fixture(scope="module")
def server(checkpoint, key_file):
    import ray
    from ray import serve

    from rayfine.serve.deploy import deploy

    overrides = {"port": free_port(), "cpus_per_replica": 0.5, "autoscaling": True, "min_replicas": 1, "max_replicas": 2,
                 "max_text_chars": 200, "max_items": 8, "max_batch_size": 8, "max_ongoing_requests": 16,
                 "api_key_file": str(key_file)}
    result = deploy(checkpoint, name=NAME, serve_overrides=overrides, log=lambda *_: None)
    yield result
    if ray.is_initialized():
        serve.shutdown()


def post(server, path, **kw):
    return requests.post(server["url"] + path, headers=kw.pop("headers", AUTH), timeout=60, **kw)


def reference(checkpoint_dir, texts):
    ckpt = load_checkpoint(checkpoint_dir)
    return ckpt.predict_proba(Preprocessor(ckpt.cfg, str(checkpoint_dir))(texts)).numpy(), ckpt.labels


def test_metadata_and_autoscaling_config(server):
    from ray.serve.context import _get_global_client

    meta = requests.get(f"{server['url']}/v2/models/{NAME}", headers=AUTH, timeout=30).json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"][2] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}
    assert meta["versions"] == [server["version"]]
    deployment = _get_global_client().get_serve_details()["applications"][NAME]["deployments"]["Classifier"]
    scaling = deployment["deployment_config"]["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (1, 2, 8)
    assert deployment["deployment_config"]["ray_actor_options"]["num_cpus"] == 0.5


def test_v2_and_predict_answer_like_the_in_process_model(server, checkpoint):
    expected, labels = reference(checkpoint, TEXTS)
    positive = labels.index("positive")
    assert expected[0, positive] > expected[1, positive]  # it learnt something real

    r = post(server, f"/v2/models/{NAME}/infer",
             json={"id": "t1", "inputs": [{"name": "text", "shape": [4], "datatype": "BYTES", "data": TEXTS}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "t1" and body["model_version"] == server["version"]
    out = {o["name"]: o for o in body["outputs"]}
    assert np.allclose(np.reshape(out["probabilities"]["data"], (4, 2)), expected, atol=1e-4)
    assert out["label"]["data"] == [labels[i] for i in expected.argmax(1)]

    # Triton's client: the texts as binary BYTES (UTF-8), every output back as binary data.
    import tritonclient.http as tc

    text = tc.InferInput("text", [len(TEXTS)], "BYTES")
    text.set_data_from_numpy(np.array(TEXTS, dtype=np.object_))
    client = tc.InferenceServerClient(server["url"].removeprefix("http://"), network_timeout=60)
    try:
        result = client.infer(NAME, [text], headers=dict(AUTH))
    finally:
        client.close()
    assert np.allclose(result.as_numpy("probabilities"), expected, atol=1e-4)
    assert [x.decode() for x in result.as_numpy("label")] == [labels[i] for i in expected.argmax(1)]

    for r in (post(server, "/predict", json={"inputs": TEXTS}),
              post(server, "/predict", files=[("inputs", (None, t)) for t in TEXTS]),
              post(server, "/predict", files=[("files", (f"{i}.txt", t.encode(), "text/plain")) for i, t in enumerate(TEXTS)])):
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
        assert [p["label"] for p in got] == [labels[i] for i in expected.argmax(1)]
        assert np.allclose([p["score"] for p in got], expected.max(1), atol=1e-4)


def test_bad_text_requests_get_a_4xx_and_the_server_keeps_serving(server):
    infer = f"/v2/models/{NAME}/infer"

    def v2(data, name="text", datatype="BYTES", shape=None):
        return {"json": {"inputs": [{"name": name, "shape": shape or [len(data)], "datatype": datatype, "data": data}]}}

    table = [
        ("oversized text", "/predict", {"json": {"inputs": ["great " * 40]}}, 400, "exceeds the limit of 200"),
        ("oversized text (v2)", infer, v2(["x" * 201]), 400, "exceeds the limit of 200"),
        ("empty text", "/predict", {"json": {"inputs": ["   "]}}, 400, "empty text"),
        ("not a string", "/predict", {"json": {"inputs": [42]}}, 400, "expected a string"),
        ("numbers as BYTES", infer, v2([1, 2]), 400, "BYTES elements must be JSON strings"),
        ("pixels for a text model", infer, v2([0] * 4, "pixels", "UINT8", [1, 2, 2]), 400, "unknown input 'pixels'"),
        ("wrong datatype", infer, v2(["a"], datatype="FP32"), 400, "datatype must be BYTES"),
        ("too many items", "/predict", {"json": {"inputs": ["fine"] * 9}}, 400, "too many items: 9"),
        ("empty inputs", "/predict", {"json": {"inputs": []}}, 400, "no inputs"),
        ("malformed JSON", infer, {"data": "{", "headers": {**AUTH, "Content-Type": "application/json"}}, 400, "malformed JSON"),
        ("wrong content type", "/predict", {"data": "a fine film", "headers": {**AUTH, "Content-Type": "text/plain"}}, 415,
         "Content-Type must be"),
        ("unknown model", "/v2/models/digits/infer", v2(["a"]), 404, "unknown model 'digits'"),
        ("missing API key", "/predict", {"json": {"inputs": ["a"]}, "headers": {}}, 401, "missing API key"),
        ("wrong API key", "/predict", {"json": {"inputs": ["a"]}, "headers": {"X-API-Key": KEY + "x"}}, 401, "invalid API key"),
    ]
    failures = []
    for what, path, kwargs, status, message in table:
        r = post(server, path, **kwargs)
        error = r.json().get("error", "") if r.headers.get("content-type", "").startswith("application/json") else r.text
        if r.status_code != status or message not in error:
            failures.append(f"{what}: got {r.status_code} {error!r}, wanted {status} with {message!r}")
    assert not failures, "\n".join(failures)
    assert post(server, "/predict", json={"inputs": TEXTS[:1]}).status_code == 200


def test_rayfine_predict_with_texts(server, key_file):
    expected = post(server, "/predict", json={"inputs": TEXTS[:2]}).json()["predictions"]
    out = subprocess.run([RAYFINE, "predict", server["url"], *TEXTS[:2], "--api-key-file", str(key_file)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.strip().splitlines()[1:]]
    assert [r[1] for r in rows] == [p["label"] for p in expected]
    assert rows[1][0] == TEXTS[1]
