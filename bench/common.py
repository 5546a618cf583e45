"""What every benchmark script shares: command-line flags, the results file, statistics, the machine.

Each script measures one figure and writes it under its own key of the results file:

    python bench/ingest.py                 # full run -> bench/results.json["ingest"]
    python bench/ingest.py --quick         # tiny setting (for tests) -> bench/out/results.quick.json
    python bench/ingest.py --quick --results /tmp/r.json

The results file is shared (other scripts, and other agents' figures such as ``reliability``): a
script reads it, replaces only its own key and the ``machine`` block, and writes it back under a
file lock, so keys it does not know are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

from rayfine.runtime import free_port  # noqa: F401  (a free loopback port for the servers measured)

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results.json"
OUT = BENCH / "out"  # scratch space and quick results (git-ignored)
QUICK_RESULTS = OUT / "results.quick.json"


def parse_args(description: str, extra: Optional[callable] = None) -> argparse.Namespace:
    """``--quick`` (or BENCH_QUICK=1): the tiny setting; ``--results PATH``: where to write."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                   help="tiny setting: seconds, not minutes; figures are not meaningful (used by tests)")
    p.add_argument("--results", type=Path, default=None,
                   help=f"results file to merge into (default {RESULTS.relative_to(ROOT)}, "
                        f"or {QUICK_RESULTS.relative_to(ROOT)} with --quick)")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if args.results is None:
        args.results = QUICK_RESULTS if args.quick else RESULTS
    return args


# --- statistics -------------------------------------------------------------------------------


def summary(values: Iterable[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements: {median, min, max, iqr, n, values}."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no measurements")
    ordered = sorted(vals)
    if len(ordered) >= 4:
        q = statistics.quantiles(ordered, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = ordered[-1] - ordered[0]
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "iqr": iqr,
            "n": len(ordered), "values": vals}


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0-100) by linear interpolation, as numpy's default does."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# --- the machine ------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU count and model, memory, OS, Python, Ray and torch versions, the date."""
    import ray
    import torch

    cpuinfo: dict[str, str] = {}  # the first processor's fields
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            name, _, value = line.partition(":")
            cpuinfo[name.strip()] = value.strip()
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpuinfo.get("model name", ""),
        # A virtual machine's model name may say only "AMD EPYC": family and model tell its generation
        # apart, and torch's kernels (AVX2 or AVX512) set how much a batch of images saves over one.
        "cpu_family_model": f"{cpuinfo.get('cpu family', '?')}/{cpuinfo.get('model', '?')}",
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gib": mem_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def measured_on(machine: dict[str, Any], versions: bool = True) -> str:
    """One line naming the machine a section ran on (each section keeps its own); a machine block
    written before family/model and torch's capability were recorded names what it has."""
    cpu = [machine.get("cpu_model") or "unknown model"]
    if machine.get("cpu_family_model"):
        cpu.append(f"family/model {machine['cpu_family_model']}")
    if machine.get("torch_cpu_capability"):
        cpu.append(f"torch {machine['torch_cpu_capability']}")
    named = ", ".join(f"{k} {machine[k]}" for k in ("ray", "torch") if machine.get(k)) if versions else ""
    return f"{machine.get('cpus')} CPUs ({', '.join(cpu)}), {machine.get('memory_gib')} GiB" + (f"; {named}" if named else "")


# --- the results file -------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _finite(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {value} is not a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _finite(v, f"{where}[{i}]")


def write_result(path: Path, key: str, value: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Merge ``{key: value}`` (and the machine block) into the results file; other keys are kept."""
    _finite(value, key)
    machine = machine_info()
    value = {**value, "quick": quick, "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "measured_on": measured_on(machine)}
    with _locked(path):
        data: dict[str, Any] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError:
                data = {}
        data[key] = value
        data.setdefault("machine", {}).update(machine)
        tmp = tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp")
        with tmp:
            json.dump(data, tmp, indent=1, sort_keys=False)
            tmp.write("\n")
        os.replace(tmp.name, path)
    print(f"[bench] {key} -> {path}", flush=True)
    return data


def read_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


# --- small helpers ----------------------------------------------------------------------------


def scratch_dir(name: str) -> Path:
    """A fresh folder under bench/out/ for one script's runs (removed by the caller's context)."""
    OUT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=OUT))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def env_for_children() -> dict[str, str]:
    """Environment of subprocesses: offline, unbuffered, the src tree importable."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return env


PYTHON = sys.executable
