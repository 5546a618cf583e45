"""The CLI's own decisions, with the stages it drives replaced (unit tier)."""

from __future__ import annotations

import contextlib
import signal
import time
import types

import pytest
import ray
from ray import serve

from rayfine import cli


@pytest.mark.parametrize("action, stops_the_app", [
    ("deployed", True), ("swapped", False), ("kept", False), ("unchanged", False)])
def test_run_on_a_cluster_stops_at_ctrl_c_only_the_app_it_deployed(tmp_path, monkeypatch, action, stops_the_app):
    """`rayfine run --address ...` serves until Ctrl-C and then deletes its app; when an app of that
    name was already serving (the new winner was swapped into it, or it was kept), the app is not
    the command's: it returns at once and leaves it serving, as `rayfine serve` does."""
    import rayfine.pipeline
    import rayfine.runtime
    import rayfine.tune.search

    deleted = []
    monkeypatch.setattr(rayfine.tune.search, "preflight", lambda cfg, resume=False: cfg)
    monkeypatch.setattr(rayfine.runtime, "ray_session", lambda address=None: contextlib.nullcontext(False))
    monkeypatch.setattr(rayfine.pipeline, "run_pipeline", lambda cfg, **_: {
        "serve": {"action": action, "name": "digits", "version": "v2", "url": "http://127.0.0.1:8000",
                  "reason": "validation accuracy 0.99 > 0.98"},
        "eval": {"accuracy": 0.99}, "timings_s": {"search": 1.0}})
    monkeypatch.setattr(serve, "delete", deleted.append)
    monkeypatch.setattr(serve, "shutdown", lambda: pytest.fail("an app on a cluster is deleted, not all of Serve"))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(gcs_address="10.0.0.1:6379"))
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # pytest's own SIGINT handler stays

    def ctrl_c(_seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", ctrl_c)
    assert cli.main(["run", "resnet18_digits_tiny", "--runs-dir", str(tmp_path), "--address", "10.0.0.1:6379"]) == 0
    assert deleted == (["digits"] if stops_the_app else [])
