"""Reliability figures: what the fault-injection suite measured, merged into bench/results.json.

    python bench/reliability.py                  # merge bench/out/reliability.json -> results.json["reliability"]
    python bench/reliability.py --run            # first run the fault suite (pytest -m faults) under the Ray lock
    python bench/reliability.py --run --tune-resume   # and tests/test_tune_resume.py (issue 8, item 3)

The tests (tests/test_faults*.py) break real runs and record what they saw with
``tests/fault_tools.record`` into bench/out/reliability.json, one key per scenario: requests failed
and lost when a Serve replica dies, epochs redone after a killed worker or driver, recovery seconds,
fuzz cases and 5xx answers, the accuracy difference against an uninterrupted run. This script
only merges them (a scenario whose test did not run this time is kept from the last time it did,
with its own ``recorded_at``). `rayfine tune --resume` after a killed driver is tested by
tests/test_tune_resume.py, which asserts its guarantees; with --tune-resume this script runs it and
records whether it passed and how long it took.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, ROOT, parse_args, read_results, write_result  # noqa: E402

FIGURES = OUT / "reliability.json"
LOCK = "/tmp/rayfine-ray.lock"
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]


def _pytest(args: list[str]) -> tuple[int, float, dict]:
    """Run pytest under the Ray lock; (exit code, wall seconds, {test name: "passed"/"failed"/...})."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        t0 = time.monotonic()
        code = subprocess.call(["flock", LOCK, "timeout", "1800", *PYTEST, f"--junitxml={junit}", *args], cwd=ROOT)
        wall = time.monotonic() - t0
        outcomes = {}
        if junit.is_file():
            for case in ET.parse(junit).iter("testcase"):
                kids = {child.tag for child in case}
                outcomes[case.get("name")] = ("failed" if kids & {"failure", "error"} else "skipped" if "skipped" in kids
                                              else "passed")
    return code, wall, outcomes


def main() -> int:
    def extra(p):
        p.add_argument("--run", action="store_true", help="run the fault suite first (pytest -m faults)")
        p.add_argument("--tune-resume", action="store_true", help="also run tests/test_tune_resume.py")

    args = parse_args(__doc__.splitlines()[0], extra)
    previous = read_results(args.results).get("reliability", {})
    value = {k: v for k, v in previous.items() if k not in ("quick", "measured_at")}
    if args.run:
        code, wall, outcomes = _pytest(["-m", "faults", "tests"])
        value["suite"] = {"command": "pytest -m faults tests", "exit_code": code, "wall_s": round(wall, 1),
                          "passed": sum(o == "passed" for o in outcomes.values()),
                          "failed": sorted(n for n, o in outcomes.items() if o == "failed")}
    if args.tune_resume:
        code, wall, outcomes = _pytest(["tests/test_tune_resume.py"])
        value["tune_driver_killed"] = {
            "covered_by": "tests/test_tune_resume.py (SIGKILLed `rayfine tune` driver, then --resume)",
            "passed": code == 0, "wall_s": round(wall, 1),
            # What that test asserts; true only when it passed.
            "finished_trials_run_again": 0 if code == 0 else None,
            "epochs_trained_twice": 0 if code == 0 else None,
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    if FIGURES.is_file():
        value.update(json.loads(FIGURES.read_text()))
    if not value:
        print(f"no figures in {FIGURES}: run the fault suite first (--run)", file=sys.stderr)
        return 1
    write_result(args.results, "reliability", value, quick=args.quick)
    print(json.dumps(value, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
