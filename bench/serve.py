"""Serving: requests/s and p50/p99 latency of a real checkpoint at concurrency 1, 8 and 32.

    python bench/serve.py            # results.json["serve"]
    python bench/serve.py --quick    # a tiny checkpoint, a few requests (tests)

Servers, all answering the same POST /predict (one base64 PNG digit per request, top_k 1):
  (a) rayfine on Ray Serve with dynamic batching (the serve: defaults of the checkpoint),
  (b) the same app without batching (serve.max_batch_size=1, serve.max_items=1),
  (c) the same preprocessing and model in a plain FastAPI + uvicorn app, one process
      (bench/plain_app.py), run while no Ray is up,
  and the floor: the model called in-process (``run_batch``), no HTTP at all.
(a) and (b) are deployed side by side (1 CPU each, the whole 2-CPU cluster) under their own route
prefixes and measured in turn, so that a repeat needs no redeploy. Load: bench/loadgen.py, an
asyncio + aiohttp loop in its own process, a bounded number of requests and seconds, 127.0.0.1 only;
the CPU it spends per request is recorded with each cell (it shares the 2 CPUs with the servers).
``batching_gain_c32`` = (a) / (b) requests/s at concurrency 32, the median over the repeats.

The checkpoint: resnet18_digits (16 px grayscale digits, ResNet-18 with the small stem) trained
for a few epochs here: a real model, the one `rayfine run resnet18_digits` serves.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

CONCURRENCY = (1, 8, 32)
FULL = {"preset": "resnet18_digits", "epochs": 3, "extra": [], "repeats": 3,
        "requests": {1: 300, 8: 800, 32: 1600}, "duration_s": 20.0, "floor_calls": 300}
QUICK = {"preset": "resnet18_digits_tiny", "epochs": 1, "extra": ["data.subsample=0.2"], "repeats": 1,
         "requests": {1: 10, 8: 24, 32: 64}, "duration_s": 10.0, "floor_calls": 10}
BODIES = 64  # distinct real digits, sent in turn


def train_checkpoint(size: dict, runs_dir: Path) -> Path:
    from rayfine.config import load_config
    from rayfine.train import fit

    cfg = load_config(size["preset"], ["name=serve-bench", f"storage.runs_dir={runs_dir}", f"train.epochs={size['epochs']}",
                                       "tracking.tensorboard=false", *size["extra"]])
    summary = fit(cfg, log=common.log)
    return Path(summary["checkpoint"])


def request_bodies(path: Path) -> list[dict]:
    """Real digits (the last BODIES of scikit-learn's set) as PNG files, base64 in /predict bodies."""
    from PIL import Image

    from rayfine.data.sources import _builtin_digits

    images, _ = _builtin_digits()
    bodies = []
    for image in images[-BODIES:]:
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        bodies.append({"inputs": [base64.b64encode(png.getvalue()).decode()], "top_k": 1})
    path.write_text(json.dumps(bodies))
    return bodies


def load(url: str, bodies_path: Path, concurrency: int, size: dict) -> dict:
    """One bounded run of the load generator (its own process) against ``url``."""
    cmd = [common.PYTHON, str(common.BENCH / "loadgen.py"), url, str(bodies_path), "--concurrency", str(concurrency),
           "--requests", str(size["requests"][concurrency]), "--duration", str(size["duration_s"]),
           "--warmup", str(2 * concurrency)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=size["duration_s"] * 3 + 120,
                          env=common.env_for_children())
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["ok"] == 0:
        raise RuntimeError(f"no successful request to {url}: {result}")
    return result


def labels_from(url: str, bodies: list[dict]) -> list[str]:
    import httpx

    with httpx.Client(timeout=60) as client:
        out = []
        for body in bodies:
            r = client.post(url, json=body)
            r.raise_for_status()
            out.append(r.json()["predictions"][0]["label"])
        return out


def floor(checkpoint: Path, bodies: list[dict], calls: int) -> dict:
    """The model called in-process: the same preprocessing and forward pass, no server."""
    import torch

    from rayfine.config import ServeConfig
    from rayfine.serve.model import load_served, run_batch

    torch.set_num_threads(1)
    served = load_served(checkpoint, ServeConfig())
    items = [base64.b64decode(b["inputs"][0]) for b in bodies]
    for i in range(10):
        run_batch(served, [[items[i % len(items)]]])
    single = []
    for i in range(calls):
        started = time.perf_counter()
        run_batch(served, [[items[i % len(items)]]])
        single.append(time.perf_counter() - started)
    batched = {}
    for batch in (16, 32):
        group = [[items[j % len(items)]] for j in range(batch)]  # one request of one item each
        rounds = max(3, calls // batch)
        started = time.perf_counter()
        for _ in range(rounds):
            run_batch(served, group)
        batched[f"batch_{batch}_items_per_s"] = rounds * batch / (time.perf_counter() - started)
    labels = []
    for item in items:
        probs = run_batch(served, [[item]])[0].probs
        labels.append(served.labels[int(probs.argmax())])
    return {
        "p50_ms": common.percentile(single, 50) * 1000,
        "p99_ms": common.percentile(single, 99) * 1000,
        "items_per_s": calls / sum(single),
        **batched,
        "labels": labels,
    }


def deploy_pair(checkpoint: Path, port: int) -> dict[str, str]:
    from rayfine.serve.deploy import deploy

    urls = {}
    for key, overrides in (("batched", {}), ("unbatched", {"max_batch_size": 1, "max_items": 1})):
        result = deploy(checkpoint, name=f"bench-{key}", log=common.log,
                        serve_overrides={"port": port, "route_prefix": f"/{key}", **overrides})
        urls[key] = result["url"] + "/predict"
    return urls


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the plain app exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the plain app did not answer {url} within {timeout_s}s")


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    size = QUICK if args.quick else FULL
    scratch = common.scratch_dir("serve")
    bodies_path = scratch / "bodies.json"
    bodies = request_bodies(bodies_path)
    runs: dict[str, dict[int, list[dict]]] = {k: {c: [] for c in CONCURRENCY} for k in ("batched", "unbatched", "plain")}
    served_labels = {}
    try:
        from ray import serve

        from rayfine.runtime import ray_session

        with ray_session(log=common.log):
            checkpoint_src = train_checkpoint(size, scratch / "runs")
            checkpoint = scratch / "checkpoint"
            shutil.copytree(checkpoint_src, checkpoint)
            port = common.free_port()
            urls = deploy_pair(checkpoint, port)
            try:
                for key in ("batched", "unbatched"):
                    served_labels[key] = labels_from(urls[key], bodies)
                for c in CONCURRENCY:
                    for repeat in range(size["repeats"]):
                        for key in ("batched", "unbatched"):
                            r = load(urls[key], bodies_path, c, size)
                            runs[key][c].append(r)
                            common.log(f"  {key:9s} c={c:2d} #{repeat + 1}: {r['rps']:.1f} req/s, "
                                       f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, errors {r['errors']}")
                stats = {key: serve.get_app_handle(f"bench-{key}").info.remote().result(timeout_s=30)["stats"]
                         for key in ("batched", "unbatched")}
            finally:
                serve.shutdown()

        common.log("plain FastAPI + uvicorn (no Ray running)")
        port = common.free_port()
        proc = subprocess.Popen([common.PYTHON, str(common.BENCH / "plain_app.py"), str(checkpoint), "--port", str(port)],
                                env=common.env_for_children(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_ready(f"http://127.0.0.1:{port}/health", proc)
            url = f"http://127.0.0.1:{port}/predict"
            served_labels["plain"] = labels_from(url, bodies)
            for c in CONCURRENCY:
                for repeat in range(size["repeats"]):
                    r = load(url, bodies_path, c, size)
                    runs["plain"][c].append(r)
                    common.log(f"  plain     c={c:2d} #{repeat + 1}: {r['rps']:.1f} req/s, "
                               f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, errors {r['errors']}")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        common.log("in-process floor")
        floor_result = floor(checkpoint, bodies, size["floor_calls"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    table = {}
    for key, by_c in runs.items():
        table[key] = {}
        for c, rs in by_c.items():
            table[key][f"c{c}"] = {
                "rps": common.summary(r["rps"] for r in rs),
                "p50_ms": common.summary(r["p50_ms"] for r in rs)["median"],
                "p99_ms": common.summary(r["p99_ms"] for r in rs)["median"],
                "requests": sum(r["requests"] for r in rs),
                "errors": sum(r["errors"] for r in rs),
                "loadgen_cpu_ms_per_request": common.summary(r["cpu_ms_per_request"] for r in rs)["median"],
            }
    gains = [b["rps"] / u["rps"] for b, u in zip(runs["batched"][32], runs["unbatched"][32])]
    gain = common.summary(gains)
    floor_labels = floor_result.pop("labels")
    result = {
        "batching_gain_c32": gain["median"],
        "batching_gain_c32_stats": gain,
        "batched_vs_plain_c32": (table["batched"]["c32"]["rps"]["median"] / table["plain"]["c32"]["rps"]["median"]),
        "servers": table,
        "floor": floor_result,
        "same_answers": all(served_labels[k] == floor_labels for k in served_labels),
        "batch_stats": {k: v for k, v in stats.items()},
        "repeats": size["repeats"],
        "requests_per_run": {f"c{c}": n for c, n in size["requests"].items()},
        "run_cap_s": size["duration_s"],
        "model": {"preset": size["preset"], "epochs": size["epochs"]},
        "goal": ">= 3",
        "goal_met": gain["median"] >= 3,
        "compared": ("requests/s at concurrency 32 of rayfine on Ray Serve with dynamic batching (serve: defaults) / "
                     "the same app with serve.max_batch_size=1; plus a plain FastAPI + uvicorn app with the same "
                     "preprocessing and model, and the in-process call as the floor"),
    }
    common.write_result(args.results, "serve", result, args.quick)
    common.log(f"batching_gain_c32 {result['batching_gain_c32']:.2f}; same answers everywhere: {result['same_answers']}")


if __name__ == "__main__":
    main()
