"""Run every benchmark, then write the readable page: what `make bench` does.

    python bench/run.py                       # all figures -> bench/results.json, bench/RESULTS.md
    python bench/run.py --only ingest,serve   # some of them (the others stay as they were)
    python bench/run.py --quick               # tiny settings -> bench/out/results.quick.json (+ .md)

Each script runs in a process of its own (each starts and stops its own embedded Ray), one after
the other: they would distort each other's figures if they overlapped. Measured on 2 CPUs: ingest
1 min, train_overhead 12-17 (both pairs), serve 8-9, memory 3, end_to_end 6-10, asha about 28 per seed (3 seeds): about
two hours in all; `bench/asha.py --seeds 1,2` runs some seeds and keeps the others.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import report

SCRIPTS = ("ingest", "train_overhead", "serve", "memory", "end_to_end", "asha")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds each; figures not meaningful)")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(SCRIPTS)}")
    p.add_argument("--results", type=Path, help="results file (default bench/results.json, or the quick one)")
    a = p.parse_args()
    chosen = SCRIPTS if not a.only else tuple(s.strip() for s in a.only.split(",") if s.strip())
    unknown = sorted(set(chosen) - set(SCRIPTS))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(SCRIPTS)}")
    results = a.results or (common.QUICK_RESULTS if a.quick else common.RESULTS)
    failed = []
    for name in chosen:
        cmd = [common.PYTHON, str(common.BENCH / f"{name}.py"), "--results", str(results), *(["--quick"] if a.quick else [])]
        common.log(f"=== {name}: {' '.join(cmd[1:])}")
        started = time.perf_counter()
        code = subprocess.call(cmd, cwd=common.ROOT, env=common.env_for_children())
        common.log(f"=== {name}: exit {code} after {time.perf_counter() - started:.0f}s")
        if code != 0:
            failed.append(name)
    md = results.with_name("RESULTS.md") if results == common.RESULTS else results.with_suffix(".md")
    md.write_text(report.render(common.read_results(results)))
    common.log(f"wrote {md}")
    if failed:
        common.log(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
