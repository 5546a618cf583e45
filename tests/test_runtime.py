"""rayfine.runtime: an embedded local Ray whose workers find their own State API beside another Ray.

Ray Train's placement-group cleaner (in a worker) calls the State API without an address; with a
second local Ray on the machine, Ray's autodetection fails ("Found multiple active Ray
instances"), the cleaner dies, and the placement groups of trials ASHA stops leak until a search
hangs (seen in bench/asha.py while another rayfine command ran). Here: a real second Ray, and a
Ray task asking the State API for an actor, with rayfine's setting and without it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
from fault_tools import another_ray, stop_session

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def other_ray():
    """Another embedded Ray on this machine, as a second rayfine command would start."""
    with another_ray() as proc:
        yield proc


def test_workers_reach_their_own_state_api_beside_another_ray(other_ray):
    import ray

    from rayfine.runtime import API_SERVER_ENV, WORKER_ENV, local_ray

    @ray.remote(num_cpus=0)
    class Marker:
        def ping(self) -> str:
            return "here"

    @ray.remote(num_cpus=0)
    def worker_setup() -> dict:
        import logging
        import os

        from ray.util.debug import log_once

        # Ray Train's placement-group cleaner logs through this logger in a worker process like this one.
        cleaner = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")

        def shown(message: str) -> bool:
            return bool(cleaner.filter(cleaner.makeRecord(cleaner.name, logging.WARNING, "cleaner.py", 1, message, None, None)))

        return {"progress_warning_left": log_once("ray_data_progress_manager_disabled"),  # False once said
                "preemption_watcher": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"),
                "train_poll_s": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"),
                "cleanup_notice": shown("Detected that the Ray Train controller actor (0a1b) is dead. Cleaning up "
                                        "placement group = [PlacementGroupID(2c3d)] created by this run."),
                "cleanup_failure": shown("Failed to clean up placement group: the GCS is unreachable")}

    @ray.remote(num_cpus=0)
    def actor_state(actor_id: str) -> str:
        from ray.util.state import get_actor

        try:
            state = get_actor(actor_id, timeout=30)
            return state.state if state else "missing"
        except ConnectionError as e:
            return f"error: {e}"

    with local_ray({"env_vars": dict(WORKER_ENV)}, num_cpus=1, logging_level="WARNING"):
        marker = Marker.remote()
        assert ray.get(marker.ping.remote()) == "here"
        actor_id = marker._actor_id.hex()
        deadline = time.time() + 30
        while (seen := ray.get(actor_state.remote(actor_id))) != "ALIVE" and time.time() < deadline:
            time.sleep(1)  # the dashboard may still be starting
        assert seen == "ALIVE"
        # Without the address rayfine gives, Ray's autodetection sees two clusters: the bug.
        bare = actor_state.options(runtime_env={"env_vars": {API_SERVER_ENV: ""}}).remote(actor_id)
        assert "multiple active Ray instances" in ray.get(bare)
        # Every worker ran rayfine's setup hook and got the embedded Ray's own settings: the routine
        # cleanup notice is dropped, a failed cleanup is still reported.
        setup = {"progress_warning_left": False, "preemption_watcher": "0", "train_poll_s": "0.5",
                 "cleanup_notice": False, "cleanup_failure": True}
        assert ray.get(worker_setup.remote()) == setup
        # ... also where the task has env_vars of its own, as Ray Train's controller has (those it
        # copies from the driver's environment): Ray merges them with the session's.
        own_env = worker_setup.options(runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}}).remote()
        assert ray.get(own_env) == setup
    assert other_ray.poll() is None  # the other Ray was left alone


def test_workers_keep_an_idle_process_through_a_pause_and_run_at_the_drivers_priority():
    """Ray keeps idle workers only up to the CPUs nothing holds; rayfine's embedded Ray keeps one
    per CPU, so a data task after a pause (each epoch's, each evaluation's) reuses its process.
    And its workers run at the driver's priority (Ray's worker_niceness 0), not 15 below it."""
    import os

    import ray

    from rayfine.runtime import (
        WORKER_ENV,
        idle_worker_config,
        local_ray,
        local_system_config,
        metrics_export_config,
        worker_niceness_config,
    )

    assert worker_niceness_config(environ={}) == {"worker_niceness": 0}
    assert worker_niceness_config(environ={"RAY_worker_niceness": "15"}) == {}  # the user's wins
    assert metrics_export_config(environ={}) == {"enable_metrics_collection": False}  # test_faults checks the ports
    assert metrics_export_config(environ={"RAY_enable_metrics_collection": "1"}) == {}  # the user's wins
    assert local_system_config(2, environ={}) == {"num_workers_soft_limit": 2, "worker_niceness": 0,
                                                  "enable_metrics_collection": False}

    assert idle_worker_config(2, environ={}) == {"num_workers_soft_limit": 2}
    assert idle_worker_config(2, environ={"RAY_num_workers_soft_limit": "0"}) == {}  # the user's wins
    # Without num_cpus, the count Ray gives the node: in a container with a CPU quota (cgroups),
    # the quota, not the host's CPUs.
    with mock.patch("ray._private.utils._get_docker_cpus", return_value=1.0), \
            mock.patch("multiprocessing.cpu_count", return_value=64):
        assert idle_worker_config(environ={}) == {"num_workers_soft_limit": 1}
    # Ray's helper is private: should a later Ray move it, the CPUs this process may run on.
    with mock.patch.dict(sys.modules, {"ray._private.utils": None}):
        assert idle_worker_config(environ={}) == {"num_workers_soft_limit": len(os.sched_getaffinity(0))}

    @ray.remote(num_cpus=1.8)
    class Trainer:  # holds the CPUs, as Ray Train's workers do
        def ready(self) -> bool:
            return True

        def niceness(self) -> int:
            return os.nice(0)

    @ray.remote(num_cpus=0.1)
    def data_task() -> int:
        return os.getpid()

    with local_ray({"env_vars": dict(WORKER_ENV)}, num_cpus=2, logging_level="WARNING"):
        trainer = Trainer.remote()
        assert ray.get(trainer.ready.remote())
        assert ray.get(trainer.niceness.remote()) == os.nice(0)  # the driver's, as plain PyTorch runs
        first = ray.get(data_task.remote())
        time.sleep(2.5)  # Ray kills a surplus idle worker after 1 s (idle_worker_killing_time_threshold_ms)
        assert ray.get(data_task.remote()) == first


TOKEN_PROBE = """
import os, stat
from pathlib import Path
from rayfine.runtime import local_ray
os.umask(0o022)  # the usual one: what Ray would write its token under
with local_ray({}, num_cpus=1, include_dashboard=False, logging_level="WARNING"):
    pass
token = Path.home() / ".ray" / "auth_token"
print(oct(stat.S_IMODE(token.stat().st_mode)), oct(stat.S_IMODE(token.parent.stat().st_mode)), len(token.read_text()))
"""


def test_an_embedded_rays_new_token_is_readable_by_this_account_only(tmp_path):
    """Ray writes a missing ~/.ray/auth_token under the umask (644 with 022), and whoever reads it
    can run code on the session's ports; rayfine writes it first, mode 600 (a fresh HOME here)."""
    import os
    import re
    import stat

    from rayfine.runtime import restrict_token_file

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    proc = subprocess.run([sys.executable, "-c", TOKEN_PROBE], env={**env, "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["0o600", "0o700", "64"], proc.stdout  # Ray's format: 32 random bytes in hex

    # A token file of this account that others can read is restricted, its token kept ...
    token = tmp_path / ".ray" / "auth_token"
    kept = token.read_text()
    token.chmod(0o644)
    assert restrict_token_file({"HOME": str(tmp_path)}) == str(token)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == kept
    named = tmp_path / "named-token"
    named.write_text("abc")
    named.chmod(0o640)
    assert restrict_token_file({"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(named)}) == str(named)
    assert stat.S_IMODE(named.stat().st_mode) == 0o600 and named.read_text() == "abc"
    assert re.fullmatch("[0-9a-f]{64}", kept)
    # ... and nothing is written where token auth is off or the token comes from the environment.
    for setting in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_TOKEN": "from-env"}):
        assert restrict_token_file({"HOME": str(tmp_path / "other"), **setting}) is None
    assert not (tmp_path / "other").exists()


SESSION_PROBE = """
import json, logging, os, signal
from ray.data import DataContext
from rayfine.runtime import PG_CLEANER_LOGGER, RAY_COLOR_ENV, RAY_INIT_ENV, WORKER_ENV, ray_session

def mine(signum, frame):
    pass

signal.signal(signal.SIGTERM, mine)
signal.signal(signal.SIGUSR1, mine)
os.environ["RAY_USAGE_STATS_ENABLED"] = "1"

def state():
    ctx = DataContext.get_current()
    return {"env": {k: os.environ.get(k) for k in (*WORKER_ENV, *RAY_INIT_ENV, RAY_COLOR_ENV)},
            "sigterm": signal.getsignal(signal.SIGTERM) is mine, "sigusr1": signal.getsignal(signal.SIGUSR1) is mine,
            "levels": [logging.getLogger(n).level for n in ("ray", "ray.data")],
            "bars": [ctx.enable_progress_bars, ctx.print_on_execution_start],
            "filters": len(logging.getLogger(PG_CLEANER_LOGGER).filters)}

before = state()
with ray_session(log=lambda *_: None):
    during = state()
print(json.dumps([before, during, state()]))
"""


def test_a_session_leaves_the_process_as_it_found_it():
    """rayfine as a library (a notebook, a script that goes on): ray.init replaced the caller's SIGTERM
    handler with Ray's (which exits), and the session left its environment variables, the ray and
    ray.data loggers' levels and Ray Data's progress bars changed for the rest of the process."""
    import json
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DATA_LOG_LEVEL", "PYTHONBREAKPOINT")}
    proc = subprocess.run([sys.executable, "-c", SESSION_PROBE], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, during, after = json.loads(proc.stdout.splitlines()[-1])
    for key in ("env", "levels", "bars", "filters"):
        assert during[key] != before[key], key  # what the session changes, so that the test can tell
    assert during["sigterm"] is False  # rayfine's own while the session is open (Terminated)
    assert during["env"]["RAY_COLOR_PREFIX"] == "0"  # stdout is a pipe here: Ray's forwarded lines uncoloured
    assert after == before


SIGNAL_IN_INIT_PROBE = """
import os, signal, sys
import ray
import ray._private.node as node
from rayfine.runtime import Terminated, ray_session, termination_signal

made, shutdown, sent = node.Node.__init__, ray.shutdown, []

def made_then_signal(self, *args, **kwargs):  # Ray's processes are up; ray.init goes on to connect
    made(self, *args, **kwargs)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))

def signal_then_shutdown(*args, **kwargs):  # as Ray starts to stop its processes
    if not sent:
        sent.append(os.kill(os.getpid(), getattr(signal, sys.argv[1])))
    shutdown(*args, **kwargs)

if sys.argv[2] == "init":
    node.Node.__init__ = made_then_signal
else:
    ray.shutdown = signal_then_shutdown
try:
    with ray_session(log=lambda *_: None):
        print("the session ran", flush=True)
except Terminated:
    print("terminated", termination_signal(), flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_leftovers_are_the_processes_writing_the_sessions_logs_not_their_readers(tmp_path):
    """What end_leftover_processes ends: a process writing a file of the session's logs folder (as
    each Ray process writes its own), not one reading it (a user's `tail -f`), nor one writing elsewhere."""
    from rayfine.runtime import end_leftover_processes, session_processes

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "raylet.out").write_text("started\n")
    idle = [sys.executable, "-c", "import signal; signal.pause()"]  # until this test ends it
    with ((logs / "worker.err").open("w") as out, (logs / "raylet.out").open() as log,
          (tmp_path / "other.log").open("w") as other):
        writer = subprocess.Popen(idle, stderr=out)
        reader = subprocess.Popen(idle, stdin=log)
        elsewhere = subprocess.Popen(idle, stderr=other)
    try:
        assert session_processes(str(logs)) == [writer.pid]
        assert end_leftover_processes(str(logs), grace_s=0) == [writer.pid]
        assert writer.wait(timeout=10) == -9 and reader.poll() is None and elsewhere.poll() is None
        assert session_processes(str(logs)) == []
    finally:
        for proc in (writer, reader, elsewhere):
            proc.kill()
            proc.wait()


def test_a_worker_whose_python_cannot_exit_does_not_outlive_the_session():
    """An actor dropped by its last handle leaves Ray's session at once; a process whose Python then
    cannot exit (here a thread that is not a daemon; once, a Ray Train controller) used to stay for
    good, reparented to init, after ray.shutdown(). The embedded Ray ends what is left of its session."""
    import os

    import ray
    from net_tools import wait_for

    from rayfine.runtime import WORKER_ENV, local_ray, session_logs_dir, session_processes

    @ray.remote(num_cpus=0)
    class Stuck:
        def start(self) -> int:
            import threading

            threading.Thread(target=threading.Event().wait, daemon=False).start()  # waits for good
            return os.getpid()

    def state() -> str | None:  # the process's state letter; None once it is gone
        stat = Path(f"/proc/{pid}/stat")
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return None

    pid = None
    try:
        with local_ray({"env_vars": dict(WORKER_ENV)}, num_cpus=1, logging_level="WARNING"):
            logs_dir = session_logs_dir()
            stuck = Stuck.remote()
            pid = ray.get(stuck.start.remote())
            assert pid in session_processes(logs_dir)
            del stuck  # Ray kills the actor: its core worker leaves the session, its Python waits for the thread
            wait_for(lambda: "Shutdown completed successfully" in "".join(
                log.read_text() for log in Path(logs_dir).glob(f"python-core-worker-*_{pid}.log")), 30, 0.2,
                "the actor's core worker to shut down")
            # A Python that could exit would now within a second; this one waits for its thread.
            with pytest.raises(AssertionError, match="timed out"):
                wait_for(lambda: state() in (None, "Z"), 1, 0.1, "the actor's process to exit")
        # Whatever the kill found ends within moments (the stuck actor with it); before, it stayed for good.
        wait_for(lambda: session_processes(logs_dir) == [], 10, 0.1, "no process of the session left")
        assert state() in (None, "Z")
    finally:
        if pid is not None and state() not in (None, "Z"):
            os.kill(pid, signal.SIGKILL)  # this test's stuck actor: not left behind when it fails


@pytest.mark.parametrize("signame, when, said", [
    ("SIGTERM", "init", ["terminated 15"]), ("SIGHUP", "init", ["terminated 1"]), ("SIGINT", "init", ["interrupted"]),
    ("SIGTERM", "shutdown", ["the session ran", "terminated 15"])])
def test_a_signal_while_ray_starts_or_stops_ends_the_session_and_leaves_no_process(signame, when, said):
    """Ctrl-C or SIGTERM in the seconds ray.init starts Ray's processes (a KeyboardInterrupt raised
    inside it, or Ray's own handler's sys.exit) left the dashboard and runtime-env agents running,
    reparented to init and holding ports; SIGTERM exited 15 with no word. While ray.shutdown stops
    them, a signal waits until it is done."""
    import os

    from fault_tools import session_pids

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", SIGNAL_IN_INIT_PROBE, signame, when], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
        assert (proc.returncode, out.splitlines()) == (0, said), err[-3000:]
        deadline = time.time() + 30
        while session_pids(proc.pid) and time.time() < deadline:
            time.sleep(0.5)
        assert session_pids(proc.pid) == []
    finally:
        stop_session(proc.pid, grace_s=0)  # what this test started, should anything be left
