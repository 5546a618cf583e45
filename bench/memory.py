"""Memory: peak RSS of the driver and of each training worker of a digits and a rotten tomatoes run.

    python bench/memory.py            # results.json["memory"]
    python bench/memory.py --quick    # the tiny presets, one short epoch each (tests)

Each run is the real command, `rayfine train PRESET` (its embedded local Ray included), in a
subprocess. The Ray processes are the driver's descendants (the embedded Ray's raylet starts
them); every SAMPLE_S seconds this script walks that process tree with psutil and reads each
process's ``VmHWM`` (the kernel's peak RSS, so nothing between two samples is missed), the
driver's included, and its USS (memory no other process shares, sampled). The driver's figure is
its own VmHWM, last read up to SAMPLE_S before it exits. (``ru_maxrss`` from ``wait4``, recorded as
``driver_or_reaped_peak_rss_mib``, is the largest of the driver's and of every descendant it or its
children reaped: Linux fills it with RUSAGE_BOTH.) Training workers are the processes titled
``ray::RayTrainWorker``; the Train controller ``ray::TrainController``.

RSS counts shared pages in every process that touches them: the torch libraries, and the pages
of Ray's object store (/dev/shm) a worker reads its data blocks from. USS leaves those out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

SAMPLE_S = 0.25
FULL = {
    "digits": ("resnet18_digits", ["train.epochs=3"]),
    # MiniLM on 2 CPUs trains ~10 snippets/s: one epoch over a tenth of the snippets keeps the model,
    # batch size and max_length (what sets the memory) while taking minutes, not an hour.
    "rotten_tomatoes": ("minilm_rotten_tomatoes", ["train.epochs=1", "data.subsample=0.1"]),
}
QUICK = {
    "digits": ("resnet18_digits_tiny", ["train.epochs=1", "data.subsample=0.2"]),
    "rotten_tomatoes": ("minilm_rotten_tomatoes_tiny", ["train.epochs=1", "data.subsample=0.02"]),
}
MIB = 2**20


def vm_hwm(pid: int) -> int:
    """Peak RSS in bytes (VmHWM) of a live process; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def title(proc) -> str:
    import psutil

    try:
        cmdline = proc.cmdline()
        return (cmdline[0] if cmdline else proc.name()).strip()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


class TreeSampler:
    """Peak VmHWM and sampled USS of every descendant of ``pid``, by process title."""

    def __init__(self, pid: int):
        import psutil

        self.root = psutil.Process(pid)
        self.root_hwm = 0  # the driver's own peak RSS
        self.peaks: dict[int, dict] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        tick = 0
        while not self._stop.is_set():
            try:
                children = self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            self.root_hwm = max(self.root_hwm, vm_hwm(self.root.pid))
            for child in children:
                name = title(child)
                if not name:
                    continue
                entry = self.peaks.setdefault(child.pid, {"title": name, "hwm": 0, "uss": 0})
                # The title Ray gives a process, kept: an exiting process has no cmdline, and its
                # name() (comm, 15 characters: "ray::RayTrainWo") would hide a training worker.
                if name.startswith("ray::") and not entry["title"].startswith(name):
                    entry["title"] = name
                entry["hwm"] = max(entry["hwm"], vm_hwm(child.pid))
                if tick % 4 == 0 and name.startswith(("ray::RayTrainWorker", "ray::TrainController")):
                    try:
                        entry["uss"] = max(entry["uss"], child.memory_full_info().uss)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            self.samples += 1
            tick += 1
            self._stop.wait(SAMPLE_S)


def measure(preset: str, sets: list[str], scratch: Path) -> dict:
    cmd = [str(Path(common.PYTHON).parent / "rayfine"), "train", preset, "--runs-dir", str(scratch),
           "--set", "tracking.tensorboard=false", *[x for s in sets for x in ("--set", s)]]
    common.log("$ " + " ".join(cmd))
    log_path = scratch / f"{preset}.log"
    started = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=scratch, env=common.env_for_children(), stdout=out, stderr=subprocess.STDOUT)
        with TreeSampler(proc.pid) as sampler:
            # wait4: the exit status, and ru_maxrss: the driver's or a reaped descendant's peak RSS.
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + log_path.read_text()[-3000:])
    workers = [p for p in sampler.peaks.values() if p["title"].startswith("ray::RayTrainWorker")]
    controllers = [p for p in sampler.peaks.values() if p["title"].startswith("ray::TrainController")]
    from rayfine.config import load_config

    expected = load_config(preset, sets).scaling.num_workers
    if len(workers) != expected:
        raise RuntimeError(f"{len(workers)} ray::RayTrainWorker processes seen, where the run has {expected}, among "
                           f"{sorted({p['title'] for p in sampler.peaks.values()})}")
    others = sorted((p for p in sampler.peaks.values() if p not in workers and p not in controllers),
                    key=lambda p: -p["hwm"])[:5]
    return {
        "preset": preset,
        "overrides": sets,
        "driver_peak_rss_mib": sampler.root_hwm / MIB,
        "driver_or_reaped_peak_rss_mib": usage.ru_maxrss * 1024 / MIB,
        "worker_peak_rss_mib": max(p["hwm"] for p in workers) / MIB,
        "worker_peak_uss_mib": max(p["uss"] for p in workers) / MIB,
        "workers_peak_rss_mib": [p["hwm"] / MIB for p in workers],
        "controller_peak_rss_mib": max((p["hwm"] for p in controllers), default=0) / MIB,
        "largest_other_processes": [{"title": p["title"][:60], "peak_rss_mib": p["hwm"] / MIB} for p in others],
        "samples": sampler.samples,
        "wall_s": wall,
    }


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    runs = QUICK if args.quick else FULL
    scratch = common.scratch_dir("memory")
    result: dict = {}
    try:
        for key, (preset, sets) in runs.items():
            result[key] = measure(preset, sets, scratch)
            r = result[key]
            common.log(f"{key}: driver {r['driver_peak_rss_mib']:.0f} MiB, worker {r['worker_peak_rss_mib']:.0f} MiB "
                       f"(USS {r['worker_peak_uss_mib']:.0f} MiB), {r['wall_s']:.0f}s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.update({
        "repeats": 1,
        "sample_interval_s": SAMPLE_S,
        "compared": ("peak RSS of the `rayfine train` driver process (VmHWM) and of its Ray Train worker "
                     "processes (VmHWM), for resnet18_digits and minilm_rotten_tomatoes; absolute, no ratio"),
    })
    common.write_result(args.results, "memory", result, args.quick)


if __name__ == "__main__":
    main()
