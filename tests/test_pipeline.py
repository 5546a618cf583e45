"""`rayfine run` end to end on an embedded local Ray: ASHA search whose trials are 2-worker DDP
runs -> the winner evaluated -> served over HTTP -> Ctrl-C stops it (integration tier)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from fault_tools import stop_session
from net_tools import check_served_as_checkpoint
from PIL import Image

from rayfine.data import NO_CPUS_WARNING

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rayfine_run_searches_evaluates_and_serves_until_interrupted(tmp_path, digits):
    port = free_port()
    cmd = [
        sys.executable, "-m", "rayfine.cli", "run", "resnet18_digits_tiny", "--runs-dir", str(tmp_path),
        # One trial (the search itself, several trials and ASHA's stopping, is test_tune's): a
        # distributed run of 2 DDP workers. Each trial costs ~40 s here, so one keeps the suite short.
        "--set", "tune.num_samples=1",
        "--set", "tune.trial_overrides=[train.epochs=2, scaling.num_workers=2, scaling.cpus_per_worker=0.45, scaling.data_cpus=0.25]",
        "--set", f"serve.port={port}", "--set", "serve.cpus_per_replica=0.5",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its embedded Ray's processes join its session
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None and not any("serving until Ctrl-C" in x for x in lines):
            time.sleep(1)
        output = "".join(lines)
        assert proc.poll() is None, f"rayfine run exited early ({proc.returncode}):\n{output[-4000:]}"
        assert "serving until Ctrl-C" in output, output[-4000:]

        # It printed the endpoint and a ready-to-paste curl command.
        url = re.search(r"\[run\] \S+ deployed: version \w+ at (http://\S+)", output).group(1)
        assert url == f"http://127.0.0.1:{port}"
        assert f"-F files=@image.png '{url}/predict?top_k=3'" in output

        # The search ran with ASHA and 2-worker trials; the winner was evaluated on the test split.
        run_dir = tmp_path / "resnet18_digits_tiny"
        summary = json.loads((run_dir / "tune" / "summary.json").read_text())
        assert summary["num_trials"] == 1 and summary["scheduler"] == "asha"
        best_cfg = (run_dir / "tune" / "best" / "config.yaml").read_text()
        assert "num_workers: 2" in best_cfg
        evaluation = json.loads((run_dir / "tune" / "best" / "eval.json").read_text())
        assert evaluation["split"] == "test" and evaluation["num_samples"] > 0

        # The served model answers a real digit with the winner's version.
        images, labels = digits
        png = io.BytesIO()
        Image.fromarray(images[7]).save(png, format="PNG")
        reply = requests.post(f"{url}/predict", files={"files": ("seven.png", png.getvalue(), "image/png")}, timeout=60)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert len(body["predictions"]) == 1 and body["model_version"] in output
        # ... exactly as the winner's checkpoint answers it in this process.
        check_served_as_checkpoint(body["predictions"], run_dir / "tune" / "best" / "checkpoint", [png.getvalue()])

        # Only rayfine's lines and Ray's warnings that matter: no warning about Ray Data's progress
        # bars (rayfine turns them off on purpose) from the trials' data readers, no core_worker
        # error line from Ray Train's preemption watcher (nothing to watch on an embedded Ray), no
        # routine notice from its placement-group cleaner (rayfine.runtime._ROUTINE_CLEANUP_FILTER), no
        # false alarm that the data "will hang" for want of CPUs (rayfine.data.no_false_cpu_alarm).
        assert "Progress bars disabled" not in output and "PreemptionWatcher" not in output, output[-4000:]
        assert "Cleaning up placement group" not in output, output[-4000:]
        assert NO_CPUS_WARNING not in output, output[-4000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            stop_session(proc.pid, grace_s=0)  # the command and what it started
            proc.wait()
    assert proc.returncode == 0, "".join(lines)[-3000:]
    assert any("stopping resnet18_digits_tiny" in x for x in lines)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=5)
