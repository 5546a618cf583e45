"""Helpers of the fault-injection suite (tests/test_faults*.py): processes started in a session of
their own and stopped exactly, listening sockets, and the figures the suite records.

Figures go to bench/out/reliability.json (git-ignored), one key per scenario, merged under a file
lock; `python bench/reliability.py` merges them into bench/results.json["reliability"].
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "bench" / "out" / "reliability.json"


def record(scenario: str, figures: dict[str, Any]) -> None:
    """Merge ``{scenario: figures}`` into bench/out/reliability.json (other scenarios are kept)."""
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    with open(str(FIGURES) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(FIGURES.read_text()) if FIGURES.is_file() else {}
        except json.JSONDecodeError:
            data = {}
        data[scenario] = {**figures, "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = FIGURES.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
        os.replace(tmp, FIGURES)
    print(f"\n[reliability] {scenario}: {json.dumps(figures, default=float)}")


# --- processes started in a session of their own ----------------------------------------------


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a process started with start_new_session has sid = its pid)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # [0] state, [3] session id
            pids.append(int(entry.name))
    return pids


def stop_session(sid: int, grace_s: float = 5.0) -> list[int]:
    """Wait up to ``grace_s`` for the session's processes to end, SIGKILL the rest; returns those."""
    deadline = time.time() + grace_s
    while session_pids(sid) and time.time() < deadline:
        time.sleep(0.5)
    survivors = session_pids(sid)
    if survivors:
        print("still running, SIGKILLed:", describe(survivors))
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while session_pids(sid) and time.time() < deadline:
        time.sleep(0.2)
    return survivors


def describe(pids: list[int]) -> list[str]:
    """Each pid with the start of its command line."""
    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes().replace(bytes(1), b' ').decode()[:120]}")
        except OSError:
            out.append(f"{pid}: (gone)")
    return out


def start_cli(args: list[str], log_path: Path, ray_tmp: str | None = None, env: dict | None = None) -> subprocess.Popen:
    """`rayfine ARGS` in a session of its own (its embedded Ray too), output appended to log_path."""
    full = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if ray_tmp:
        full["RAY_TMPDIR"] = ray_tmp
    full.pop("RAY_ADDRESS", None)
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "rayfine.cli", *args], env=full, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)


ANOTHER_RAY = """
import sys, ray
ray.init(address="local", num_cpus=1, include_dashboard=False)
print("up", flush=True)
sys.stdin.read()  # until the block ends: another_ray closes our stdin
ray.shutdown()
"""


@contextmanager
def another_ray() -> Iterator[subprocess.Popen]:
    """Another embedded Ray on this machine while the block runs, as a second rayfine command (or
    a user's script) would start: a script in a session of its own, with its Ray's processes."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-c", ANOTHER_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else "(nothing in 120 s)"
        if line.strip() != "up":
            raise RuntimeError(f"the other Ray did not start: {line!r}")
        yield proc
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        stop_session(proc.pid, grace_s=5)  # what of its Ray has not ended by now
        proc.wait()
        proc.stdout.close()


# --- listening sockets ------------------------------------------------------------------------


def listeners(pids: set[int]) -> list[dict[str, Any]]:
    """TCP sockets in LISTEN state owned by ``pids``: {pid, name, ip, port}."""
    import psutil

    out = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in pids:
            continue
        try:
            name = psutil.Process(conn.pid).name()
        except psutil.Error:
            name = "?"
        out.append({"pid": conn.pid, "name": name, "ip": conn.laddr.ip, "port": conn.laddr.port})
    return out


def descendants(pid: int) -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()
