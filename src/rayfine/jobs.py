"""Ray Jobs: submit a rayfine job to a running cluster, then follow it (status, logs, stop).

    rayfine submit resnet18_digits --address http://127.0.0.1:8265 --job pipeline --follow
    rayfine jobs list | status ID | logs ID [--follow] | stop ID

    from rayfine.jobs import connect, submit
    result = submit(cfg, "resnet18_digits", job="train", client=connect("http://head:8265"))

A job is ``python ray_jobs/<job>.py --config ... --set ...`` run by Ray's JobSubmissionClient with
the project directory as ``working_dir`` (minus .venv, runs, .git, data and caches): it carries the
entrypoints and your config files, and the cluster's own installed rayfine runs them (the venv of
`ray start` on cluster/local, the image on KubeRay and AWS). The submission id is deterministic,
``rayfine-<job>-<name>-<hash of the resolved config>``: submitting the same job and config again
finds the first submission (Ray keeps a submission id for the life of the cluster) and reports or
follows it instead of running it twice. ``--resume`` (tune and pipeline jobs: continue the search
of a job whose driver stopped) passes ``--resume`` to the entrypoint, under the id ``...-resume``.

Token authentication: Ray's own client adds the token header only when ``RAY_AUTH_MODE=token`` is
set in the client's environment (``ray._private.authentication.http_token_authentication``), so
that a token is not sent to whatever address is given. rayfine reads the token itself, from the
sources Ray uses, in Ray's order: ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``,
``~/.ray/auth_token``, and sends it as ``Authorization: Bearer`` to a loopback address (the local
cluster, a ``kubectl port-forward``, ``ray dashboard``'s tunnel) without ``RAY_AUTH_MODE``; to
another host only with ``RAY_AUTH_MODE=token``, Ray's rule (``token_for``). ``RAY_AUTH_MODE=disabled``
sends none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from rayfine.errors import RayfineError

JOB_KINDS = ("train", "tune", "pipeline")
RESUMABLE_JOBS = ("tune", "pipeline")  # a search is continued only when asked (--resume)
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # where Ray looks for a cluster, in its order
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Never uploaded: environments, run outputs, data, VCS and caches (gitwildmatch patterns, as in
# .gitignore; Ray also honours the project's .gitignore and .rayignore).
EXCLUDES = [
    ".venv/", "venv/", ".git/", "/runs/", "/data/", "/datasets/", "/bench/out/",
    "__pycache__/", "*.pyc", "*.egg-info/", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/",
    "build/", "dist/", "node_modules/",
]
NOT_UPLOADED_DIRS = ("data", "datasets", "runs", ".venv", "venv")
# Settings of this shell that the job should see too: offline mode and quiet logs. Secrets (API
# keys, HF_TOKEN) are never forwarded: a runtime_env is readable by every holder of the token.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "RAY_DATA_LOG_LEVEL")


class JobsError(RayfineError, RuntimeError):
    """The Jobs API could not be reached or refused the request; the message says what to do."""


# --- where and who ---------------------------------------------------------------------------


def resolve_address(address: Optional[str] = None, environ: Optional[dict] = None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else an http(s) RAY_ADDRESS, else the local dashboard."""
    env = os.environ if environ is None else environ
    ray_address = env.get("RAY_ADDRESS", "")
    chosen = address or env.get("RAY_API_SERVER_ADDRESS") or (ray_address if ray_address.startswith(("http://", "https://")) else "")
    chosen = (chosen or DEFAULT_ADDRESS).rstrip("/")
    if "://" not in chosen:
        chosen = "http://" + chosen
    if not chosen.startswith(("http://", "https://")):
        raise JobsError(f"--address {chosen}: the Jobs API is the dashboard's HTTP address, e.g. {DEFAULT_ADDRESS}")
    return chosen


def resolve_token(environ: Optional[dict] = None, home: Optional[Path] = None) -> tuple[Optional[str], str]:
    """(token or None, where it came from), in Ray's order of precedence."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise JobsError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file ({e.strerror})") from None
        if not token:
            raise JobsError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return token, str(path)
    path = (home or Path.home()) / ".ray" / "auth_token"
    try:
        token = path.read_text().strip()
    except OSError:
        return None, "no token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token are unset or missing)"
    return (token, str(path)) if token else (None, f"{path} is empty")


def token_for(url: str, environ: dict | None = None, home: Path | None = None) -> tuple[str | None, str]:
    """(the token to send to the Jobs API at ``url``, or None; where it came from, or why it is not
    sent): ``resolve_token``'s on a loopback address or with RAY_AUTH_MODE=token, else none. A
    token found in this shell is another cluster's as likely as this one's, and the Jobs API is
    often plain HTTP: Ray sends it to another host only when told to (RAY_AUTH_MODE=token)."""
    from urllib.parse import urlsplit

    from rayfine.runtime import is_loopback

    env = os.environ if environ is None else environ
    token, source = resolve_token(env, home)
    host = urlsplit(url).hostname or ""
    if token is None or is_loopback(host) or env.get("RAY_AUTH_MODE", "").lower() == "token":
        return token, source
    return None, (f"the token of {source} is not sent to {host} without RAY_AUTH_MODE=token (Ray's rule: a token "
                  "goes to another host only when asked)")


class _Translate:
    """Turns the SDK's exceptions into one readable line (JobsError)."""

    def __init__(self, address: str, token_source: str):
        self.address, self.token_source = address, token_source

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        # BrokenPipeError is a ConnectionError, but of this process's stdout (`jobs logs ID | head`):
        # the CLI's main() tells a reader that went away from a failure.
        if exc is None or isinstance(exc, (JobsError, KeyboardInterrupt, BrokenPipeError)):
            return False
        import requests
        from ray.exceptions import AuthenticationError

        text = str(exc)
        if isinstance(exc, AuthenticationError) and "required" in text.lower() and "not sent to" in self.token_source:
            raise JobsError(f"{self.address} requires a Ray auth token: {self.token_source}; set RAY_AUTH_MODE=token "
                            "in this shell to send it") from None
        if isinstance(exc, AuthenticationError) and "required" in text.lower():
            raise JobsError(
                f"{self.address} requires a Ray auth token and none was sent ({self.token_source}): set "
                "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or save it in ~/.ray/auth_token (`ray get-auth-token` "
                "on the head node prints it)") from None
        if isinstance(exc, AuthenticationError) and self.token_source.startswith("no token"):
            # rayfine sent none; with RAY_AUTH_MODE=token Ray's own loader adds the token file of
            # this user account (found through the password database, not $HOME).
            raise JobsError(f"{self.address} refused the Ray auth token Ray found on its own (rayfine found "
                            f"{self.token_source}): it is not this cluster's token; set RAY_AUTH_TOKEN or "
                            "RAY_AUTH_TOKEN_PATH to this cluster's token") from None
        if isinstance(exc, AuthenticationError):
            raise JobsError(f"{self.address} refused the Ray auth token from {self.token_source}: it is not this "
                            "cluster's token") from None
        if isinstance(exc, (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            raise JobsError(f"cannot reach the Ray Jobs API at {self.address}: is the cluster up, and is this its "
                            "dashboard address (port 8265 by default)?") from None
        if isinstance(exc, RuntimeError) and "status code 404" in text:
            raise JobsError(f"no such job on {self.address} (`rayfine jobs list` shows the jobs)") from None
        return False


def connect(address: Optional[str] = None, environ: Optional[dict] = None):
    """A JobSubmissionClient for the cluster at ``address`` carrying the auth token, or JobsError."""
    from ray.job_submission import JobSubmissionClient

    from rayfine.runtime import restored_environ

    url = resolve_address(address, environ)
    token, source = token_for(url, environ)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    # Ray's client takes RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, over the address it is given
    # (ray.dashboard.utils.get_address_for_submission_client): an --address wins over the shell's.
    hidden = ADDRESS_ENV if address else ()
    with _Translate(url, source), restored_environ(*hidden):
        for key in hidden:
            os.environ.pop(key, None)
        client = JobSubmissionClient(url, headers=headers)
    client.rayfine_token_source = source  # for the error messages of later calls
    return client


def _calls(client) -> _Translate:
    return _Translate(getattr(client, "_address", "the cluster"), getattr(client, "rayfine_token_source", "?"))


# --- what is submitted -----------------------------------------------------------------------


def config_digest(job: str, cfg) -> str:
    """sha256 of the job kind and the resolved config: equal for the same job, different otherwise."""
    payload = json.dumps({"job": job, "config": cfg.to_dict()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def submission_id(job: str, cfg, resume: bool = False) -> str:
    """rayfine-<job>-<name>-<config hash>; a resumption gets its own id (``-resume``): Ray would
    refuse the failed job's id again."""
    return f"rayfine-{job}-{cfg.name}-{config_digest(job, cfg)[:12]}" + ("-resume" if resume else "")


def _ignore_files(folder: Path, working_dir: Path) -> list[tuple[str, Callable]]:
    """The .gitignore and .rayignore of ``folder`` as Ray reads them when it packs the working_dir
    (its own matchers; .gitignore files unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1), each with its name."""
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE
    from ray._private.runtime_env.packaging import _get_ignore_file

    include_gitignore = os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    names = (".gitignore", ".rayignore") if include_gitignore else (".rayignore",)
    found = ((name, _get_ignore_file(folder, name)) for name in names)
    return [((folder / name).relative_to(working_dir).as_posix(), match) for name, match in found if match]


def _first_excluded(node: Path, working_dir: Path, matchers: list, below: tuple[str, ...],
                    skip: Callable[[str], bool], inside: str = "") -> tuple[Path, str] | None:
    """Ray's walk of the working_dir (packaging._dir_travel), down ``below`` and then through the
    whole of ``node``: an ignore file applies from its folder down, and an excluded folder takes
    everything in it along. Returns the first excluded path and what excludes it; a path in the
    target that ``skip`` says the job does not read (``inside``: relative to the target) is passed over."""
    if inside and skip(f"{inside}/x" if node.is_dir() else inside):
        return None
    matchers = matchers + _ignore_files(node, working_dir)
    hit = next((name for name, match in matchers if match(node)), None)
    if hit:
        return node, hit
    children = [node / below[0]] if below else sorted(node.iterdir()) if node.is_dir() else []
    for child in children:
        deeper = "" if below else f"{inside}/{child.name}".lstrip("/")
        found = _first_excluded(child, working_dir, matchers, below[1:], skip, deeper)
        if found:
            return found
    return None


def ray_excluded(path: str, working_dir: Path, skip: Callable[[str], bool] = lambda relative: False,
                 ) -> tuple[str, str] | None:
    """(the path excluded, what excludes it) when Ray would leave ``path`` (relative to working_dir),
    or a file in it, out of the upload: rayfine's EXCLUDES, Ray's default excludes, or a .gitignore
    or .rayignore on the way down (Ray honours them by default); None when all of it is uploaded.
    ``skip(relative)``: a file in a folder ``path`` that does not count ("/"-separated, below it)."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import _get_excludes

    below = Path(path).parts
    if ".." in below:  # not in the working dir: not Ray's upload
        return None
    wd = working_dir.absolute()
    excludes = [("the upload's excludes (rayfine.jobs.EXCLUDES and Ray's defaults)",
                 _get_excludes(wd, get_runtime_env_default_excludes() + EXCLUDES))]
    found = _first_excluded(wd, wd, excludes, below, skip)
    return (found[0].relative_to(wd).as_posix(), found[1]) if found else None


def _excluded_hint(excluded: tuple[str, str], what: str) -> str:
    """The end of a refusal: what excludes the path, and how to get it to the cluster."""
    path, by = excluded
    how = f", or un-ignore it in {by}" if by.endswith((".gitignore", ".rayignore")) else ""
    if by.endswith(".gitignore"):
        how += " (or submit with RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1: Ray then reads no .gitignore)"
    return f"{path} is excluded by {by}, so Ray does not upload it with the working directory: {what}{how}"


def config_argument(config: str, working_dir: Path) -> str:
    """How the job names the config: a preset name as is, a file by its path inside working_dir."""
    path = Path(config).expanduser()
    if not path.is_file():
        return config
    try:
        inside = path.resolve().relative_to(working_dir.resolve())
    except ValueError:
        raise JobsError(f"config file {config} is outside the working directory {working_dir}, so the job "
                        "would not have it: move it into the project (or pass --working-dir)") from None
    if inside.parts[0] in NOT_UPLOADED_DIRS:
        raise JobsError(f"config file {config} is in {inside.parts[0]}/, which is not uploaded: move it elsewhere "
                        "in the project")
    excluded = ray_excluded(inside.as_posix(), working_dir.resolve())
    if excluded:
        raise JobsError(f"config file {config}: " + _excluded_hint(excluded, "move it elsewhere in the project"))
    return inside.as_posix()


def entrypoint(job: str, config_arg: str, overrides: Iterable[str], runs_dir: Optional[str],
               resume: bool = False) -> str:
    argv = ["python", f"ray_jobs/{job}.py", "--config", config_arg]
    for item in overrides:
        argv += ["--set", item]
    if runs_dir:
        argv += ["--runs-dir", runs_dir]
    if resume:
        argv.append("--resume")
    return shlex.join(argv)


def runtime_env(working_dir: Path, environ: Optional[dict] = None) -> dict[str, Any]:
    env = os.environ if environ is None else environ
    env_vars = {"PYTHONUNBUFFERED": "1", **{k: env[k] for k in FORWARDED_ENV if env.get(k)}}
    return {"working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": env_vars}


# --- submit and follow -----------------------------------------------------------------------


def job_info(client, job_id: str):
    with _calls(client):
        return client.get_job_info(job_id)


def _exists(client, job_id: str):
    try:
        return job_info(client, job_id)
    except JobsError as e:
        if "no such job" in str(e):
            return None
        raise


def check_submission(config: str, *, job: str, runs_dir: Optional[str], working_dir: str | Path,
                     resume: bool = False, overrides: Iterable[str] = ()) -> tuple[Path, str]:
    """What can be checked before talking to the cluster; returns (working dir, the job's --config)."""
    from rayfine.config.sections import redact_url_passwords

    for item in overrides:  # they become the job's entrypoint, which Ray shows to whoever lists jobs
        if redact_url_passwords(item) != item:
            raise JobsError(f"--set {item.split('=', 1)[0]}: its value holds a password (user:password@ in a URL), "
                            "which would show in the job's entrypoint (`rayfine jobs list`, the dashboard, the head "
                            "node's process list): write it in the config file instead")
    if job not in JOB_KINDS:
        raise JobsError(f"--job {job}: one of {', '.join(JOB_KINDS)}")
    if resume and job not in RESUMABLE_JOBS:
        raise JobsError(f"--resume: a {job} job continues the training run of its name by itself (from its last "
                        "checkpoint); submit it again without --resume")
    wd = Path(working_dir).expanduser().resolve()
    if not (wd / "ray_jobs" / f"{job}.py").is_file():
        raise JobsError(f"{wd} has no ray_jobs/{job}.py: run `rayfine submit` from the project directory "
                        "(or pass --working-dir)")
    if runs_dir and not Path(runs_dir).is_absolute():
        raise JobsError(f"--runs-dir {runs_dir}: give an absolute path that every node of the cluster mounts; "
                        "a relative one would land in the job's temporary working directory")
    return wd, config_argument(config, wd)


def _not_uploaded(path: str) -> str | None:
    """The not-uploaded folder (data, runs, ...) a relative local path starts in, else None."""
    parts = Path(path).parts
    if "://" in path or Path(path).expanduser().is_absolute() or not parts or parts[0] not in NOT_UPLOADED_DIRS:
        return None
    return parts[0]


def _check_uploaded(field: str, path: str, working_dir: Path, what: str, skip=lambda relative: False) -> None:
    """Refuses a relative path the job reads that Ray leaves out of the upload (ray_excluded)."""
    if "://" in path or Path(path).expanduser().is_absolute():
        return
    excluded = ray_excluded(path, working_dir, skip)
    if excluded:
        raise JobsError(f"{field} {path}: " + _excluded_hint(excluded, what))


def _data_reader_skips(relative: str) -> bool:
    """Whether rayfine's data reader leaves this file of a folder source out anyway (sources.skipped_path)."""
    from rayfine.data.sources import skipped_path

    return skipped_path(relative)


def check_paths(cfg, working_dir: Path | None = None) -> None:
    """The files the job reads must be where the cluster's processes find them: a relative path
    travels with the working directory only outside data/, runs/ (NOT_UPLOADED_DIRS) and what
    Ray's excludes, .gitignore and .rayignore files leave out, and files the job writes or the
    replicas read need absolute paths (the job's working directory is a temporary copy on the head
    node)."""
    wd = Path(working_dir or ".")
    source = cfg.data.source
    folder = None if source.startswith("builtin:") else _not_uploaded(source)
    shared = "put the data where every node reads it (an absolute path on shared storage, or s3://)"
    if folder:
        raise JobsError(f"data.source {source}: {folder}/ is not uploaded with the working directory; {shared}")
    if not source.startswith("builtin:"):  # in a folder, what the reader passes over (.DS_Store) may be left out
        _check_uploaded("data.source", source, wd, shared, _data_reader_skips)
    weights = cfg.model.weights
    folder = _not_uploaded(weights) if weights and weights.endswith(".safetensors") else None
    if folder:
        raise JobsError(f"model.weights {weights}: {folder}/ is not uploaded with the working directory; put the "
                        "file where every node reads it (an absolute path on shared storage)")
    if weights and weights.endswith(".safetensors"):
        _check_uploaded("model.weights", weights, wd, "put the file where every node reads it (an absolute path "
                        "on shared storage)")
    name = cfg.model.name
    # A directory in the working dir (where the job resolves it) is a local model, else a hub id.
    local_model = (wd / name).is_dir()
    folder = _not_uploaded(name) if local_model else None
    if folder:
        raise JobsError(f"model.name {name}: {folder}/ is not uploaded with the working directory; put the model "
                        "directory where every node reads it (an absolute path on shared storage)")
    if local_model:
        _check_uploaded("model.name", name, wd, "put the model directory where every node reads it (an absolute "
                        "path on shared storage)")
    storage = cfg.storage.storage_path
    if storage and "://" not in storage and not Path(storage).expanduser().is_absolute():
        raise JobsError(f"storage.storage_path {storage}: a relative path would put Ray Train/Tune's checkpoints in "
                        "the job's temporary working directory on the head node, where worker nodes cannot write "
                        "and Ray deletes them with it; give an absolute path that every node mounts "
                        "(/mnt/shared/ray) or s3://")
    key_file = cfg.serve.api_key_file
    if key_file and not Path(key_file).expanduser().is_absolute():
        raise JobsError(f"serve.api_key_file {key_file}: a relative path would be looked up in a temporary working "
                        "directory on the cluster; give an absolute path on the nodes that run the replicas (e.g. "
                        "a mounted secret), or leave it unset and set serve.api_key_env's variable there")
    mlflow = cfg.tracking.mlflow
    uri = mlflow.tracking_uri if mlflow else ""
    database = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ""  # sqlite:////abs/path.db
    if database and database != ":memory:" and not database.startswith("/"):
        raise JobsError(f"tracking.mlflow.tracking_uri {uri}: a relative SQLite file would be "
                        "written to the job's temporary working directory on the head node and lost with it; give "
                        "an absolute path on shared storage (sqlite:////mnt/shared/mlflow.db) or an MLflow server")


def submit(
    cfg,
    config: str,
    *,
    job: str = "pipeline",
    overrides: Iterable[str] = (),
    runs_dir: Optional[str] = None,
    working_dir: str | Path = ".",
    job_id: Optional[str] = None,
    resume: bool = False,
    client=None,
    address: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Submit ``job`` for the validated ``cfg`` (loaded from ``config`` + ``overrides``); with
    ``resume``, a job that continues the search of an earlier one whose driver stopped.

    Everything that can be checked here is checked before the cluster is contacted. Returns
    {"submission_id", "status", "existing", "address"}; ``existing`` is True when that submission
    id was already on the cluster (nothing new was started), ``address`` is the Jobs API's URL."""
    overrides = list(overrides)  # checked, then the entrypoint
    wd, config_arg = check_submission(config, job=job, runs_dir=runs_dir, working_dir=working_dir, resume=resume,
                                      overrides=overrides)
    check_paths(cfg, wd)
    job_id = job_id or submission_id(job, cfg, resume)
    client = client or connect(address)
    existing = _exists(client, job_id)
    if existing is None:
        if not runs_dir:
            log("[submit] no --runs-dir: the job writes its run directory to $RAYFINE_RUNS_DIR of the cluster "
                "(cluster/local/up.sh sets it), else to storage.runs_dir in its temporary working directory")
        metadata = {"rayfine.job": job, "rayfine.config": cfg.name, "rayfine.config_sha256": config_digest(job, cfg)}
        try:
            with _calls(client):
                client.submit_job(entrypoint=entrypoint(job, config_arg, overrides, runs_dir, resume),
                                  runtime_env=runtime_env(wd), submission_id=job_id, metadata=metadata)
        except RuntimeError as e:
            if "already exists" not in str(e):  # else: submitted meanwhile by someone else; report it
                raise
            existing = job_info(client, job_id)
    status = str(existing.status) if existing is not None else str(job_info(client, job_id).status)
    return {"submission_id": job_id, "status": status, "existing": existing is not None,
            "address": getattr(client, "_address", None) or resolve_address(address)}


def follow(client, job_id: str, out=None, poll_s: float = 1.0) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    import asyncio

    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    with _calls(client):
        try:
            asyncio.run(tail())
        except RuntimeError as e:  # the log stream broke off: the status below still tells the end
            print(f"[job] log stream interrupted ({e}); waiting for the job to end", file=sys.stderr)
        while True:
            status = str(client.get_job_status(job_id))
            if status in TERMINAL:
                return status
            time.sleep(poll_s)


def _when(ms: Optional[int]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def describe(info) -> str:
    took = f"{(info.end_time - info.start_time) / 1000:.0f}s" if info.start_time and info.end_time else "-"
    lines = [f"{info.submission_id}: {info.status}",
             f"  started {_when(info.start_time)}, ended {_when(info.end_time)}, took {took}",
             f"  entrypoint: {info.entrypoint}"]
    if info.message:
        lines.append(f"  message: {info.message.strip()}")
    return "\n".join(lines)


def _rerun_hint(job: str, job_id: str, resume: bool) -> str:
    """How to go on after a job FAILED or was STOPPED (Ray takes a submission id once per cluster)."""
    if job not in RESUMABLE_JOBS:
        return f"to run it again (the training run continues from its last checkpoint), pass --submission-id {job_id}-2"
    if resume:
        return f"to continue its search again, pass --resume --submission-id {job_id}-2"
    return (f"to continue its search, submit it again with --resume (same config, --set and --runs-dir); if its "
            f"search never started, pass --submission-id {job_id}-2 instead")


def _hint(job_id: str, address: str) -> str:
    where = "" if address == DEFAULT_ADDRESS else f" --address {address}"
    return (f"logs: rayfine jobs logs {job_id} --follow{where}; status: rayfine jobs status {job_id}{where}; "
            f"stop: rayfine jobs stop {job_id}{where}")


# --- the CLI's commands ----------------------------------------------------------------------


def cli_submit(cfg, config: str, *, job: str, overrides: list[str], runs_dir: Optional[str], working_dir: str,
               job_id: Optional[str], address: Optional[str], follow_logs: bool, resume: bool = False) -> int:
    result = submit(cfg, config, job=job, overrides=overrides, runs_dir=runs_dir, working_dir=working_dir,
                    job_id=job_id, resume=resume, address=address)
    job_id, status, url = result["submission_id"], result["status"], result["address"]
    if result["existing"]:
        print(f"[submit] {job_id} was already submitted to {url} (same job and resolved config): {status}")
        if status in ("FAILED", "STOPPED") and not follow_logs:
            print(f"[submit] {_rerun_hint(job, job_id, resume)} (a submission id is used once per cluster); "
                  f"its logs: rayfine jobs logs {job_id}", file=sys.stderr)
            return 1
    else:
        print(f"[submit] {job_id} submitted to {url}")
    if not follow_logs:
        print(f"[submit] {_hint(job_id, url)}")
        return 0
    final = follow(connect(url), job_id)
    print(f"[job] {job_id} {final}", flush=True)
    if final in ("FAILED", "STOPPED"):
        print(f"[submit] {_rerun_hint(job, job_id, resume)}", file=sys.stderr)
    return 0 if final == "SUCCEEDED" else 1


def cli_jobs(action: str, job_id: Optional[str], *, address: Optional[str], follow_logs: bool = False) -> int:
    client = connect(address)
    if action == "list":
        with _calls(client):
            infos = sorted(client.list_jobs(), key=lambda i: i.start_time or 0)
        if not infos:
            print("no jobs")
        for info in infos:
            name = info.submission_id or info.job_id
            print(f"{name:<52} {str(info.status):<10} {_when(info.start_time)}  {info.entrypoint[:70]}")
        return 0
    info = job_info(client, job_id)
    if action == "status":
        print(describe(info))
        return 0
    if action == "logs":
        if follow_logs:
            final = follow(client, job_id)
            print(f"[job] {job_id} {final}", flush=True)
            return 0 if final == "SUCCEEDED" else 1
        with _calls(client):
            print(client.get_job_logs(job_id), end="")
        return 0
    if action == "stop":
        with _calls(client):
            requested = client.stop_job(job_id)
            if not requested:
                print(f"{job_id} had already ended: {client.get_job_status(job_id)}")
                return 0
            deadline = time.monotonic() + 30
            status = str(client.get_job_status(job_id))
            while status not in TERMINAL and time.monotonic() < deadline:
                time.sleep(0.5)
                status = str(client.get_job_status(job_id))
        print(f"{job_id}: stop requested; now {status}")
        return 0
    raise JobsError(f"unknown action {action}")
