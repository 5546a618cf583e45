"""End to end: wall time of `rayfine run resnet18_digits`, split into Ray start, search, evaluation, deploy.

    python bench/end_to_end.py            # results.json["end_to_end"]
    python bench/end_to_end.py --quick    # the tiny preset, 2 one-epoch trials (tests)

Runs the real command (the venv's ``rayfine`` entry point) in a subprocess on an embedded local
Ray, with its run directory in a scratch folder and the Serve port a free one. The command prints
the time of each stage (``[run] winner ...; ray start Xs, search Xs, evaluation Xs, deploy Xs``);
this script also timestamps every output line as it arrives, so the total (launch to "serving")
and the command's own start-up (Python, imports, config) are measured from outside. Once it
serves, one real digit is sent to the endpoint, then Ctrl-C (SIGINT) stops it, as a user would,
and the time it takes to stop is reported too. One run: the search alone takes minutes.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

FULL = {"preset": "resnet18_digits", "sets": []}
QUICK = {"preset": "resnet18_digits_tiny", "sets": [
    "tune.num_samples=2", "data.subsample=0.2", "tune.scheduler=fifo",  # 1-epoch trials: nothing for ASHA to stop
    "tune.trial_overrides=[train.epochs=1, scaling.num_workers=1, scaling.cpus_per_worker=0.5, scaling.data_cpus=0.25]",
]}
TIMINGS = re.compile(r"\[run\] winner test accuracy ([0-9.]+); (.*)$")


def rayfine_command() -> str:
    return str(Path(common.PYTHON).parent / "rayfine")


def predict_one(url: str) -> dict:
    import httpx
    from PIL import Image

    from rayfine.data.sources import _builtin_digits

    images, labels = _builtin_digits()
    png = io.BytesIO()
    Image.fromarray(images[-1]).save(png, format="PNG")
    body = {"inputs": [base64.b64encode(png.getvalue()).decode()], "top_k": 1}
    started = time.perf_counter()
    r = httpx.post(f"{url}/predict", json=body, timeout=60)
    r.raise_for_status()
    return {"label": r.json()["predictions"][0]["label"], "true_label": str(int(labels[-1])),
            "latency_ms": (time.perf_counter() - started) * 1000}


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    size = QUICK if args.quick else FULL
    scratch = common.scratch_dir("end_to_end")
    port = common.free_port()
    cmd = [rayfine_command(), "run", size["preset"], "--runs-dir", str(scratch),
           *[x for s in [*size["sets"], f"serve.port={port}"] for x in ("--set", s)]]
    common.log("$ " + " ".join(cmd))
    lines: list[tuple[float, str]] = []
    launched = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=scratch, env=common.env_for_children(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def read() -> None:
        for line in iter(proc.stdout.readline, ""):
            lines.append((time.perf_counter() - launched, line.rstrip("\n")))
            print(f"    | {line}", end="", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.time() + 3600
        while time.time() < deadline and proc.poll() is None and not any("serving until Ctrl-C" in x for _, x in lines):
            time.sleep(0.2)
        if not any("serving until Ctrl-C" in x for _, x in lines):
            raise RuntimeError(f"rayfine run did not reach serving (exit {proc.poll()}):\n"
                               + "\n".join(x for _, x in lines[-40:]))
        serving_at = next(t for t, x in lines if "serving until Ctrl-C" in x)
        match = next(TIMINGS.search(x) for _, x in lines if TIMINGS.search(x))
        stages = {k.strip(): float(v.rstrip("s")) for k, v in (part.rsplit(" ", 1) for part in match.group(2).split(", "))}
        url = re.search(r"at (http://127\.0\.0\.1:\d+\S*)", next(x for _, x in lines if "deployed: version" in x)).group(1)
        answer = predict_one(url)
        stop_started = time.perf_counter()
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=180)
        stop_s = time.perf_counter() - stop_started
    finally:
        if proc.poll() is None:  # it did not stop on Ctrl-C: end what it started (its own session)
            import os

            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
    summary = json.loads((scratch / size["preset"] / "tune" / "summary.json").read_text())
    shutil.rmtree(scratch, ignore_errors=True)

    parts = {"ray_start_s": stages["ray start"], "search_s": stages["search"], "evaluation_s": stages["evaluation"],
             "deploy_s": stages["deploy"]}
    result = {
        "total_s": serving_at,
        **parts,
        "cli_and_rest_s": serving_at - sum(parts.values()),
        "stop_s": stop_s,
        "exit_code": proc.returncode,
        "test_accuracy": float(match.group(1)),
        "search": {k: summary[k] for k in ("num_trials", "epochs_run", "epochs_full_budget", "budget_fraction",
                                           "concurrent_trials", "trials")},
        "first_answer": answer,
        "command": " ".join(["rayfine", *cmd[1:3], *[c for c in cmd[3:] if c != "--runs-dir" and not c.startswith(str(scratch))]]),
        "repeats": 1,
        "compared": ("wall time of one `rayfine run` from launch to serving, split by the stage timings the "
                     "command prints (cli_and_rest_s: Python start-up, imports, config, and what no stage covers)"),
    }
    common.write_result(args.results, "end_to_end", result, args.quick)
    common.log(f"end_to_end {result['total_s']:.0f}s: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
