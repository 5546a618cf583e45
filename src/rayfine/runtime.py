"""Connecting to Ray: an embedded local Ray on a laptop, or an existing cluster.

    with ray_session(address=None):      # None: RAY_ADDRESS if set, else a fresh local Ray
        fit(cfg)

Inside a Ray job (or a test that already called ``ray.init``) the existing connection is reused
and left open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Iterator, Optional

# Ray Data logs every dataset execution at INFO; rayfine prints its own progress lines instead.
WORKER_ENV = {"RAY_DATA_LOG_LEVEL": "WARNING"}


# What an embedded local Ray's workers get besides WORKER_ENV. Ray Train's preemption watcher (an
# actor per training run, polling for nodes being drained, e.g. spot instances) has nothing to
# watch on the one node of an embedded Ray; its creation also logs a core_worker error line.
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s) and takes
# in one report a poll; a worker's next report waits for it (a queue of one), and the end of the run
# is seen at a poll. So an epoch shorter than 2 s took 2 s, and every run ended up to 2 s late: on a
# laptop with small data, most runs. A poll is one call to each worker, which a few local workers
# answer at once (a poll not answered within it is not a failure: Ray waits 10 minutes for that).
LOCAL_WORKER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}

# Run by every worker process of an embedded local Ray before anything else (its runtime_env's
# worker_process_setup_hook): Train workers reading their shards (and Ray Train's split coordinators,
# with data.preserve_order false) run Ray Data executions there.
WORKER_SETUP_HOOK = "rayfine.runtime.quiet_worker"


# The logger of Ray Train's placement-group cleaner, and the start of its routine announcement.
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
PG_CLEANUP_NOTICE = "Detected that the Ray Train controller actor"


class NoticeFilter(logging.Filter):
    """Drops the log records of one Ray notice: those whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# The cleaner's notice that it removed a dead training run's placement group. Ray Train starts a
# detached cleaner beside every run's controller; when the controller dies before removing its
# placement group, the cleaner removes it and says so at WARNING. In a search that is every trial
# ASHA stops (Tune ends the trial, and its controller with it) and, racing the controller's own
# removal, some trials that finished, each announced on the console in the middle of rayfine's
# trial lines. The removal still happens; a failed one is still reported.
_ROUTINE_CLEANUP_FILTER = NoticeFilter(PG_CLEANUP_NOTICE)


def quiet_worker() -> None:
    """No "Progress bars disabled" warning from this process: rayfine turns Ray Data's bars off on
    purpose (quiet_ray), and every process that runs an execution would say so once. No routine
    placement-group cleanup notice either (_ROUTINE_CLEANUP_FILTER)."""
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")
    logging.getLogger(PG_CLEANER_LOGGER).addFilter(_ROUTINE_CLEANUP_FILTER)  # once: addFilter skips a repeat


def quiet_ray() -> None:
    """Keep the console for rayfine's own progress lines (Ray's logs stay in its session dir)."""
    from ray.data import DataContext

    os.environ.update({k: os.environ.get(k, v) for k, v in WORKER_ENV.items()})
    if not sys.stdout.isatty() or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        # The lines Ray forwards from its processes ("(raylet) ...") have colour codes in their
        # prefix unless this says otherwise: not in a file or pipe, nor under NO_COLOR (no-color.org).
        os.environ.setdefault(RAY_COLOR_ENV, "0")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    quiet_worker()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def worker_runtime_env(environ: Optional[dict] = None) -> dict:
    """The driver's runtime_env: WORKER_ENV, less what this process's environment already sets.

    Inside a Ray job the job's runtime_env is already in effect (its env_vars are in our
    environment), and Ray refuses a driver runtime_env that names any of the same variables.
    """
    env = os.environ if environ is None else environ
    return {"env_vars": {k: v for k, v in WORKER_ENV.items() if k not in env}}


# What ray.init sets in this process's environment besides quiet_ray's WORKER_ENV (breakpoint() to
# Ray's debugger; the session's auth mode; usage stats off), and ray.shutdown leaves.
RAY_INIT_ENV = ("PYTHONBREAKPOINT", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")
RAY_COLOR_ENV = "RAY_COLOR_PREFIX"


@contextlib.contextmanager
def restored_environ(*keys: str) -> Iterator[None]:
    """``os.environ``'s ``keys`` put back on exit as they were on entry (set, changed or removed meanwhile)."""
    before = {key: os.environ.get(key) for key in keys}
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def borrowed_process_state() -> Iterator[None]:
    """What a Ray session of rayfine's changes in this process, put back after it, for a program that
    goes on (a notebook, a script): the environment variables quiet_ray and ray.init set, the
    handlers ray.init installs (SIGTERM: Ray's own exits the process) and Tune (SIGUSR1), the ``ray``
    and ``ray.data`` loggers' levels, Ray Data's progress-bar settings and the cleanup filter."""
    from ray.data import DataContext

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.getsignal(s) for s in (*TERMINATING_SIGNALS, signal.SIGUSR1)}
    levels = {name: logging.getLogger(name).level for name in ("ray", "ray.data")}
    ctx = DataContext.get_current()
    flags = {name: getattr(ctx, name) for name in ("enable_progress_bars", "print_on_execution_start")}
    cleaner = logging.getLogger(PG_CLEANER_LOGGER)
    filtered = _ROUTINE_CLEANUP_FILTER in cleaner.filters
    try:
        with restored_environ(*WORKER_ENV, *RAY_INIT_ENV, RAY_COLOR_ENV):
            yield
    finally:
        for signum, handler in handlers.items():
            if handler is not None:  # None: not installed from Python, cannot be put back
                signal.signal(signum, handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for name, value in flags.items():
            setattr(ctx, name, value)
        if not filtered:
            cleaner.removeFilter(_ROUTINE_CLEANUP_FILTER)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, Kubernetes stopping a pod, `ray job stop`) while a session is open: it unwinds
    as Ctrl-C does, so that the session still shuts down, and ``terminated()`` tells the two apart.

    Without it, Ray's core worker handles SIGTERM in the driver as a crash: "*** SIGTERM received
    ***", a stack dump and abort (exit 134), the session's shutdown skipped. A KeyboardInterrupt,
    not a SystemExit (Ray's Python handler's), because a blocking Ray call (ray.get, in Ray Train's
    fit) re-raises what a signal handler raised only as KeyboardInterrupt or as SystemExit(1)."""


_terminated = 0  # the signal that ended a session: SIGTERM, or SIGHUP (the terminal closed)
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def terminated() -> bool:
    """Whether SIGTERM (or SIGHUP) reached a session of this process."""
    return bool(_terminated)


def termination_signal() -> int:
    """The signal ``terminated()`` saw (0: none): a command ended by it exits 128 + its number."""
    return _terminated


def _terminate(signum: int, frame=None):
    global _terminated
    _terminated = signum
    raise Terminated()


@contextlib.contextmanager
def _terminable() -> Iterator[None]:
    """While Ray is connected: SIGTERM and SIGHUP raise Terminated (in place of Ray's handlers, whose
    SIGHUP left the dashboard and runtime-env agents running). The caller's handlers are put back
    with the rest of the process's state (``borrowed_process_state``)."""
    if threading.current_thread() is threading.main_thread():
        for signum in TERMINATING_SIGNALS:
            signal.signal(signum, _terminate)
    yield


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Around ray.init and ray.shutdown: Ctrl-C, SIGTERM and SIGHUP wait until it returns, then end
    the session as they end a running one (KeyboardInterrupt, Terminated). Both start or stop Ray's
    processes one after another; interrupted there, they left the dashboard and runtime-env agents
    running with no owner (SIGTERM met Ray's own handlers: sys.exit, exit 15, or the node's, exit 1).
    Ray's handlers are kept out meanwhile (``set_sigterm_handler``, private to Ray: without it, only
    the hold)."""
    import ray
    import ray._private.utils as ray_utils

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in (signal.SIGINT, *TERMINATING_SIGNALS)}
    set_sigterm_handler = getattr(ray_utils, "set_sigterm_handler", None)
    if set_sigterm_handler is not None:
        ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        if set_sigterm_handler is not None:
            ray_utils.set_sigterm_handler = set_sigterm_handler
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
    if received:
        ray.shutdown()
        if received[0] == signal.SIGINT:
            raise KeyboardInterrupt
        _terminate(received[0])


@contextlib.contextmanager
def ray_session(address: Optional[str] = None, log=print) -> Iterator[bool]:
    """Yields True when this call started (and will stop) an embedded local Ray. SIGTERM meanwhile
    raises ``Terminated`` (a KeyboardInterrupt), which stops the session on its way out; after it,
    the process is as it was (``borrowed_process_state``)."""
    import ray

    if ray.is_initialized():
        yield False
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        # A dashboard's (the Jobs API's) address, as `rayfine submit` and `jobs` (and Ray's job CLI)
        # take it from RAY_ADDRESS; ray.init refuses it with a 4-line ValueError.
        from rayfine.config import ConfigError

        raise ConfigError([(
            f"Ray address {address} is a dashboard (Jobs API) address, which `rayfine submit` and `rayfine jobs` "
            "take; this command connects to a cluster's GCS (host:6379) or through Ray Client (ray://host:10001): "
            "give --address, or unset RAY_ADDRESS for an embedded Ray"
        )])
    runtime_env = worker_runtime_env()
    with borrowed_process_state():
        quiet_ray()
        if address:
            log(f"[ray] connecting to {address}")
            hint = _token_hint(address)  # the shell's setting, before ray.init reads the environment
            with _signals_held():
                try:
                    ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env)
                except ConnectionError as e:
                    raise ConnectionError(f"{e}{hint}") from e
            try:
                with _terminable():
                    yield False
            finally:
                with _signals_held():
                    ray.shutdown()
        else:
            log("[ray] starting an embedded local Ray")
            with local_ray(runtime_env, logging_level=logging.WARNING), _terminable():
                yield True


def _token_hint(address: str) -> str:
    """What to add to a failed connection's message: a cluster with token authentication (all of
    cluster/'s) refuses a driver whose Ray does not send the token, and Ray sends it on an explicit
    address only when RAY_AUTH_MODE=token is set (Ray's rule); it says only that it failed to
    connect, after ~20 s of "InvalidAuthToken" lines, naming the address it resolved."""
    if address.startswith("ray://") or os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return ""
    return ("; if the cluster uses token authentication (every config in cluster/ does), set RAY_AUTH_MODE=token "
            "in this shell so that Ray sends the token (README: Running on a cluster)")


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a URL's hostname: an IP address, with an IPv6 zone or not, or a name) is this
    machine's loopback; a name other than localhost is not, whatever it resolves to."""
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a host name
        return False


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def idle_worker_config(num_cpus: Optional[float] = None, environ: Optional[dict] = None) -> dict:
    """Keep up to one idle worker process per CPU while training holds the CPUs.

    Ray's raylet keeps idle workers only up to the CPUs no task or actor holds (ray-project/ray
    #36766). While the training workers hold nearly every CPU that is none, so each epoch's Ray
    Data tasks (and each evaluation's) start new Python processes that import Ray and rayfine
    again: ~2 s of a 2-CPU machine per epoch and split. ``num_workers_soft_limit`` sets that
    idle limit; here, the node's CPU count: ``num_cpus`` when given, else the count Ray itself
    detects for the node (its cgroup quota in a container, not the host's CPUs that
    os.cpu_count() reports). Measured on 2 CPUs (resnet18_digits_tiny, 2 epochs): the second epoch
    5.1 s -> 2.4-2.6 s, the test-split evaluation 5.5 s -> 2.3-2.4 s.
    An explicit RAY_num_workers_soft_limit in the environment wins (nothing is set here then).
    """
    env = os.environ if environ is None else environ
    if "RAY_num_workers_soft_limit" in env:
        return {}
    if num_cpus is None:
        try:  # what ray.init gives the node without num_cpus (a private helper of Ray's)
            from ray._private.utils import get_num_cpus

            num_cpus = get_num_cpus(override_docker_cpu_warning=True)
        except (ImportError, AttributeError, TypeError):  # moved or changed in another Ray
            num_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"num_workers_soft_limit": max(1, int(num_cpus))}


# What the embedded Ray's worker processes run at: the niceness of the driver, and of any plain
# PyTorch process. Ray's default (RayConfig worker_niceness) is 15.
WORKER_NICENESS = 0


def worker_niceness_config(environ: dict | None = None) -> dict:
    """Run the embedded Ray's workers (training workers among them) at niceness 0, not Ray's 15.

    Ray starts every worker process at niceness 15, so that its daemons (raylet, GCS, dashboard
    and its agent, log monitor: niceness 0) win a saturated cluster node's CPUs. On a laptop the
    training workers are what the user waits for, and at 15 each wakeup of a daemon takes the CPU
    from a DDP rank at once; the other rank then waits for it at the next all-reduce. Measured on
    2 CPUs (resnet18_digits, 2 workers, steady training samples/s, runs alternating): 146, 184 and
    190 at 15; 184, 199 and 196 at 0; plain PyTorch DDP 205, 213 and 199. (Ray's job manager, too,
    starts a Ray Job's driver, its supervisor actor, at niceness 0.)
    An explicit RAY_worker_niceness in the environment wins (nothing is set here then)."""
    return _unless_set("worker_niceness", WORKER_NICENESS, environ)


def metrics_export_config(environ: dict | None = None) -> dict:
    """No metrics exporter on the embedded Ray: Ray's dashboard agent serves the node's metrics
    (Prometheus text over plain HTTP, no token) on every interface, since it binds all of them
    unless the node's address is loopback, and Ray replaces a loopback address with the host's
    (ray.dashboard.modules.reporter.reporter_agent; ray._private.services.resolve_ip_for_localhost).
    Anyone who could reach a laptop would read its apps, request rates and resources. Nothing
    rayfine does reads them: Serve's autoscaling takes its figures from its replicas and handles.
    (The dashboard's and the autoscaler's own metrics servers, on ports 44227 and 44217, Ray starts
    whatever it is told.) An explicit RAY_enable_metrics_collection in the environment wins
    (nothing is set here then)."""
    return _unless_set("enable_metrics_collection", False, environ)


def _unless_set(name: str, value, environ: dict | None) -> dict:
    """``{name: value}`` for the embedded Ray's ``_system_config``, or nothing when the environment
    sets RAY_<name> (Ray reads its settings from there too: the user's setting wins)."""
    env = os.environ if environ is None else environ
    return {} if f"RAY_{name}" in env else {name: value}


def local_system_config(num_cpus: float | None = None, environ: dict | None = None) -> dict:
    """The embedded Ray's ``_system_config``: idle workers kept, workers at normal priority, no
    metrics exporter on the network."""
    return {**idle_worker_config(num_cpus, environ), **worker_niceness_config(environ),
            **metrics_export_config(environ)}


def restrict_token_file(environ: dict | None = None) -> str | None:
    """Make the Ray token a new embedded Ray will use readable by this account only; its path, or None.

    Ray 2.60 turns token authentication on for a local ``ray.init`` and, when no token exists,
    writes a new one to ``~/.ray/auth_token`` under the process's umask: mode 644 with the usual
    022, where any account on the machine can read it, and whoever holds it can run code as this
    user on the session's ports (they bind every interface). So a missing default token is created
    here first, mode 600, in Ray's format (``secrets.token_hex(32)``), and a token file (the default
    or ``RAY_AUTH_TOKEN_PATH``) of this account that others can read is made mode 600, as
    cluster/local/up.sh does. Nothing is done when ``RAY_AUTH_MODE`` turns token auth off or
    ``RAY_AUTH_TOKEN`` holds the token; a file that cannot be changed is left to Ray."""
    import secrets
    import stat
    from pathlib import Path

    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_MODE", "token").lower() != "token" or environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(environ["RAY_AUTH_TOKEN_PATH"]) if environ.get("RAY_AUTH_TOKEN_PATH") else (
        Path(environ.get("HOME") or Path.home()) / ".ray" / "auth_token")
    try:
        if not environ.get("RAY_AUTH_TOKEN_PATH") and (not path.exists() or path.stat().st_size == 0):
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        info = path.stat()
        if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077:
            path.chmod(0o600)
    except OSError:
        pass  # Ray reads (or writes) it itself, and says what is wrong
    return str(path)


def session_processes(logs_dir: str) -> list[int]:
    """Live processes, other than this one, that hold a file of ``logs_dir`` open for writing: every
    process of a Ray session writes its own log files in its session's logs folder (a reader, such as
    a user's ``tail -f``, is not one). Empty where there is no /proc to read (not Linux)."""
    prefix = os.path.join(logs_dir, "")
    found = []
    try:
        pids = [e.name for e in os.scandir("/proc") if e.name.isdigit() and int(e.name) != os.getpid()]
    except OSError:
        return []
    for pid in pids:
        try:
            if any(os.readlink(fd.path).startswith(prefix) and _open_for_writing(pid, fd.name)
                   for fd in os.scandir(f"/proc/{pid}/fd")):
                found.append(int(pid))
        except OSError:  # gone meanwhile, or another account's
            continue
    return found


def _open_for_writing(pid: str, fd: str) -> bool:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        flags = next((int(line.split()[1], 8) for line in f if line.startswith("flags:")), os.O_RDONLY)
    return flags & 3 in (os.O_WRONLY, os.O_RDWR)


def end_leftover_processes(logs_dir: str, grace_s: float = 0.2) -> list[int]:
    """SIGKILL what is left of a stopped Ray session (``session_processes``) after ``grace_s``; returns
    the pids that were ended.

    After ``ray.shutdown()`` the session's workers and agents are on their way out (measured: ~9
    processes, all gone 0.3-0.6 s later; ending them sooner loses nothing of a run). One whose core
    worker had already left the session (an actor killed when its last handle went) but whose Python
    never exited is no longer Ray's to stop: seen once here, a Ray Train controller (an async actor;
    ray-project/ray#18533 is that kind of leak) logged "Shutdown completed successfully", then sat
    reparented to init for good, holding 831 MB, one thread asleep and its main thread waiting."""
    deadline = time.monotonic() + grace_s
    while (left := session_processes(logs_dir)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def session_logs_dir() -> str | None:
    """The logs folder of the Ray session this process started or joined (where its processes write
    their logs: ``session_processes``), or None without one (or where Ray's private API moved)."""
    import ray

    try:
        return ray._private.worker._global_node.get_logs_dir_path()
    except AttributeError:
        return None


@contextlib.contextmanager
def local_ray(runtime_env: dict, **init_kwargs) -> Iterator[None]:
    """A fresh embedded local Ray (``ray.init(address="local")``, even when a `ray start` cluster
    runs here) whose processes find their own cluster's State API; stopped on exit.

    Ray code that calls the State API without an address (Ray Train's placement-group cleaner,
    among others) looks for "the" local cluster among the running GCS processes. With a second
    embedded Ray on the machine (another rayfine command, a test run) it fails with "Found
    multiple active Ray instances", and Train then leaks the placement group of every trial ASHA
    stops, until a search hangs for lack of CPUs. So the dashboard (the State API server) gets a
    loopback port chosen here, and RAY_API_SERVER_ADDRESS names it to every worker of the session
    (the job's runtime_env) and to this process. Every worker also gets LOCAL_WORKER_ENV and runs
    WORKER_SETUP_HOOK first, unless this process's environment or ``runtime_env`` says otherwise.
    Without a ``_system_config``, the session gets ``local_system_config``; its Ray token is made
    readable by this account only (``restrict_token_file``)."""
    import ray

    restrict_token_file()

    port = free_port()  # the dashboard binds it a moment later
    url = f"http://127.0.0.1:{port}"
    local_env = {k: v for k, v in LOCAL_WORKER_ENV.items() if k not in os.environ}  # the user's setting wins
    env_vars = {**local_env, **runtime_env.get("env_vars", {}), API_SERVER_ENV: url}
    init_kwargs.setdefault("_system_config", local_system_config(init_kwargs.get("num_cpus")))
    with _signals_held():
        ray.init(address="local", dashboard_host="127.0.0.1", dashboard_port=port,
                 runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK, **runtime_env, "env_vars": env_vars},
                 **init_kwargs)
    logs_dir = session_logs_dir()
    previous = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = url
    try:
        yield
    finally:
        try:
            with _signals_held():  # a signal meanwhile is raised once Ray has stopped
                ray.shutdown()
                if logs_dir:
                    end_leftover_processes(logs_dir)
        finally:
            if previous is None:
                os.environ.pop(API_SERVER_ENV, None)
            else:
                os.environ[API_SERVER_ENV] = previous
