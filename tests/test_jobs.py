"""rayfine.jobs without a cluster: submission ids, entrypoints, what the working_dir upload holds
(through Ray's own packaging code), where the token and the address come from, and the one-line
errors of `rayfine submit` / `rayfine jobs`. The cluster side is tests/test_cluster_local.py."""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from rayfine.config import load_config
from rayfine.jobs import (
    DEFAULT_ADDRESS,
    JobsError,
    check_submission,
    config_argument,
    entrypoint,
    resolve_address,
    resolve_token,
    runtime_env,
    submission_id,
    submit,
    token_for,
)

REPO = Path(__file__).resolve().parents[1]
RAYFINE = [sys.executable, "-m", "rayfine.cli"]


def test_submission_id_is_deterministic_and_tracks_the_resolved_config():
    cfg = load_config("resnet18_digits_tiny")
    first = submission_id("train", cfg)
    assert first == submission_id("train", load_config("resnet18_digits_tiny"))
    assert first.startswith("rayfine-train-resnet18_digits_tiny-") and len(first.rsplit("-", 1)[1]) == 12
    # An override that leaves the resolved config as it is names the same job; one that changes it does not.
    assert submission_id("train", load_config("resnet18_digits_tiny", ["train.epochs=2"])) == first
    assert submission_id("train", load_config("resnet18_digits_tiny", ["train.epochs=3"])) != first
    assert submission_id("tune", cfg) != first


def test_entrypoint_survives_the_shell():
    tricky = ["name=my run", "data.labels=[a, 'b c']", "train.lr=3e-4"]
    line = entrypoint("train", "configs/x y.yaml", tricky, "/shared/runs")
    assert shlex.split(line) == ["python", "ray_jobs/train.py", "--config", "configs/x y.yaml",
                                 "--set", tricky[0], "--set", tricky[1], "--set", tricky[2], "--runs-dir", "/shared/runs"]


class FakeJobs:
    """A cluster's Jobs API as `submit` uses it (get_job_info, submit_job), with jobs already there."""

    _address = "http://jobs.example:8265"

    def __init__(self, statuses: dict[str, str] | None = None):
        self.statuses = dict(statuses or {})  # submission id -> status
        self.submitted: list[dict] = []

    def get_job_info(self, job_id: str):
        if job_id not in self.statuses:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        return SimpleNamespace(status=self.statuses[job_id])

    def submit_job(self, **request):
        self.submitted.append(request)
        self.statuses[request["submission_id"]] = "PENDING"
        return request["submission_id"]


def test_a_resumed_search_job_runs_with_resume_under_an_id_of_its_own():
    """The stopped job's id is taken for good (Ray uses a submission id once per cluster)."""
    cfg = load_config("resnet18_digits_tiny", ["train.epochs=2"])
    stopped = submission_id("tune", cfg)
    assert submission_id("tune", cfg, resume=True) == f"{stopped}-resume"
    client = FakeJobs({stopped: "STOPPED"})
    result = submit(cfg, "resnet18_digits_tiny", job="tune", overrides=["train.epochs=2"], runs_dir="/shared/runs",
                    working_dir=REPO, resume=True, client=client)
    assert result == {"submission_id": f"{stopped}-resume", "status": "PENDING", "existing": False,
                      "address": client._address}
    (request,) = client.submitted
    assert request["submission_id"] == f"{stopped}-resume"
    assert shlex.split(request["entrypoint"]) == ["python", "ray_jobs/tune.py", "--config", "resnet18_digits_tiny",
                                                  "--set", "train.epochs=2", "--runs-dir", "/shared/runs", "--resume"]
    assert entrypoint("pipeline", "c.yaml", [], None, resume=True) == "python ray_jobs/pipeline.py --config c.yaml --resume"


def test_job_main_forwards_resume_to_the_search_and_refuses_it_for_training(monkeypatch, capsys):
    """ray_jobs/tune.py and pipeline.py hand --resume to `rayfine tune` / `rayfine run`, whose own
    parser must take it; ray_jobs/train.py refuses it (a training run continues by itself)."""
    from rayfine import cli

    monkeypatch.delenv("RAYFINE_RUNS_DIR", raising=False)
    forwarded: list[list[str]] = []
    monkeypatch.setattr(cli, "main", lambda argv: forwarded.append(argv) or 0)
    assert cli.job_main("tune", ["--config", "c.yaml", "--set", "a=1", "--resume"]) == 0
    assert cli.job_main("run", ["--config", "c.yaml", "--runs-dir", "/r", "--resume"], extra=("--detach",)) == 0
    assert cli.job_main("run", ["--config", "c.yaml"], extra=("--detach",)) == 0
    assert forwarded == [["tune", "c.yaml", "--set", "a=1", "--resume"],
                         ["run", "c.yaml", "--detach", "--runs-dir", "/r", "--resume"],
                         ["run", "c.yaml", "--detach"]]
    assert [cli.build_parser().parse_args(argv).resume for argv in forwarded] == [True, True, False]
    assert cli.job_main("train", ["--config", "c.yaml", "--resume"]) == 2
    assert len(forwarded) == 3 and "continues the run of its name by itself" in capsys.readouterr().err


def test_submit_resume_from_the_command_line(monkeypatch, capsys):
    """`rayfine submit`: a stopped search job's hint names --resume; --resume submits the resumed
    job; a train job refuses --resume. Against a stand-in Jobs API."""
    from rayfine import jobs
    from rayfine.cli import main

    cfg = load_config("resnet18_digits_tiny", ['storage.runs_dir="/shared/runs"'])  # as the CLI loads it
    stopped = submission_id("tune", cfg)
    client = FakeJobs({stopped: "STOPPED", submission_id("train", cfg): "FAILED"})
    monkeypatch.setattr(jobs, "connect", lambda address=None: client)
    base = ["submit", "resnet18_digits_tiny", "--runs-dir", "/shared/runs", "--working-dir", str(REPO)]
    assert main([*base, "--job", "tune"]) == 1 and not client.submitted
    err = capsys.readouterr().err
    assert "to continue its search, submit it again with --resume" in err and stopped in err
    assert main([*base, "--job", "tune", "--resume"]) == 0
    assert f"{stopped}-resume submitted to {client._address}" in capsys.readouterr().out
    assert [shlex.split(r["entrypoint"])[-1] for r in client.submitted] == ["--resume"]
    client.statuses[f"{stopped}-resume"] = "FAILED"  # the resumed job failed too
    assert main([*base, "--job", "tune", "--resume"]) == 1
    assert f"--resume --submission-id {stopped}-resume-2" in capsys.readouterr().err
    assert main([*base, "--job", "train"]) == 1
    assert "--resume" not in capsys.readouterr().err  # a training run continues by itself
    assert main([*base, "--job", "train", "--resume"]) == 1
    assert "--resume: a train job continues the training run of its name by itself" in capsys.readouterr().err
    assert len(client.submitted) == 1


@pytest.mark.parametrize("refused, why, taken", [
    ("model.weights=runs/digits/train/checkpoint/model.safetensors",
     "model.weights runs/digits/train/checkpoint/model.safetensors: runs/ is not uploaded with the working directory",
     ["model.weights=/shared/runs/digits/train/checkpoint/model.safetensors", "model.weights=IMAGENET1K_V1"]),
    ("model.weights=data/imagenet.safetensors", "model.weights data/imagenet.safetensors: data/ is not uploaded",
     ["model.weights=weights/imagenet.safetensors"]),  # elsewhere in the project: uploaded
    ("serve.api_key_file=secrets/api_key.txt",
     "serve.api_key_file secrets/api_key.txt: a relative path would be looked up in a temporary working directory",
     ["serve.api_key_file=/etc/rayfine/api_key", "serve.api_key_file=~/api_key"]),
    ("tracking.mlflow.tracking_uri=sqlite:///runs/mlflow.db",
     ("tracking.mlflow.tracking_uri sqlite:///runs/mlflow.db: a relative SQLite file would be written to the job's "
      "temporary working directory"),
     ["tracking.mlflow.tracking_uri=sqlite:////shared/mlflow.db", "tracking.mlflow.tracking_uri=http://mlflow:5000"]),
    ("tracking.mlflow.tracking_uri=sqlite:///mlflow.db", "a relative SQLite file", []),
    ("storage.storage_path=ckpts",
     "storage.storage_path ckpts: a relative path would put Ray Train/Tune's checkpoints in the job's temporary",
     ["storage.storage_path=/shared/ray", "storage.storage_path=s3://bucket/ray", "storage.storage_path=~/ray"]),
], ids=["weights-in-runs", "weights-in-data", "api-key-file", "sqlite-in-runs", "sqlite-here", "storage-path"])
def test_submit_refuses_paths_the_cluster_would_not_find(refused, why, taken):
    client = FakeJobs()
    with pytest.raises(JobsError, match=re.escape(why)):
        submit(load_config("resnet18_digits_tiny", [refused]), "resnet18_digits_tiny", job="pipeline", overrides=[refused],
               runs_dir="/shared/runs", working_dir=REPO, client=client)
    assert not client.submitted
    for override in taken:
        submit(load_config("resnet18_digits_tiny", [override]), "resnet18_digits_tiny", job="pipeline",
               overrides=[override], runs_dir="/shared/runs", working_dir=REPO, client=client)
    assert len(client.submitted) == len(taken)


def test_submit_refuses_a_local_model_directory_that_is_not_uploaded(tmp_path, monkeypatch):
    """A relative model.name that is a directory in the working dir (where the job resolves it) is a
    local model, which data/ does not carry to the cluster; the same name that is no directory there
    is a hub id, whatever the shell's directory holds."""
    project = tmp_path / "project"
    (project / "ray_jobs").mkdir(parents=True)
    for job in ("train", "tune"):
        (project / "ray_jobs" / f"{job}.py").write_text("")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "tiny-bert").mkdir(parents=True)  # beside the shell, not in the project
    cfg = load_config("minilm_rotten_tomatoes_tiny", ["model.name=data/tiny-bert"])
    client = FakeJobs()
    submit(cfg, "minilm_rotten_tomatoes_tiny", job="train", runs_dir="/shared/runs", working_dir=project, client=client)
    (project / "data" / "tiny-bert").mkdir(parents=True)
    with pytest.raises(JobsError, match=re.escape("model.name data/tiny-bert: data/ is not uploaded")):
        submit(cfg, "minilm_rotten_tomatoes_tiny", job="tune", runs_dir="/shared/runs", working_dir=project,
               client=client)
    assert len(client.submitted) == 1


def _shipped(project: Path) -> set[str]:
    """The files Ray's own packaging (what submit_job uploads) puts in the working_dir package."""
    from ray._private.runtime_env.packaging import create_package

    spec = runtime_env(project, environ={})
    target = project.parent / f"{project.name}.zip"
    target.unlink(missing_ok=True)
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE") != "1"  # as the dashboard SDK decides
    create_package(spec["working_dir"], target, include_gitignore=include_gitignore, excludes=spec["excludes"])
    return {n for n in zipfile.ZipFile(target).namelist() if not n.endswith("/")}


def test_submit_refuses_what_gitignore_or_rayignore_keeps_out_of_the_upload(tmp_path, monkeypatch):
    """Ray leaves out of the working_dir what a .gitignore or .rayignore in the project ignores; a
    config file or data the job reads from there would be missing on the cluster. The refusal names
    the file and the ignore file, and agrees with Ray's own packaging about what is uploaded."""
    project = tmp_path / "project"
    files = {"ray_jobs/train.py": "", ".gitignore": "experiments/*.local.yaml\n*.csv\n", "experiments/a.local.yaml": "",
             "experiments/b.yaml": "", "text/train.csv": "text,label\n", "text/train.jsonl": "{}\n",
             "images/cat/1.png": "x", "images/dog/.rayignore": "*.png\n", "images/dog/2.png": "x",
             "photos/cat/1.png": "x", "photos/.DS_Store": "x", "photos/.rayignore": ".DS_Store\n"}
    for name, text in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    monkeypatch.chdir(project)
    shipped = _shipped(project)
    client = FakeJobs()

    def submit_with(config: str, *overrides: str):
        preset = "minilm_rotten_tomatoes_tiny" if "text" in str(overrides) else "resnet18_digits_tiny"
        submit(load_config(preset, list(overrides)), config, job="train", runs_dir="/shared/runs",
               working_dir=project, client=client)

    refused = [(("experiments/a.local.yaml",), ("config file experiments/a.local.yaml: experiments/a.local.yaml is "
                "excluded by .gitignore, so Ray does not upload it with the working directory: move it elsewhere in "
                "the project, or un-ignore it in .gitignore (or submit with RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1")),
               (("resnet18_digits_tiny", "data.source=text/train.csv", "data.kind=text"),
                "data.source text/train.csv: text/train.csv is excluded by .gitignore"),
               (("resnet18_digits_tiny", "data.source=images"),
                ("data.source images: images/dog/2.png is excluded by images/dog/.rayignore, so Ray does not upload "
                 "it with the working directory: put the data where every node reads it (an absolute path on shared "
                 "storage, or s3://), or un-ignore it in images/dog/.rayignore"))]
    for (config, *overrides), why in refused:
        with pytest.raises(JobsError, match=re.escape(why)):
            submit_with(config, *overrides)
    assert not client.submitted
    assert {"experiments/a.local.yaml", "text/train.csv", "images/dog/2.png"}.isdisjoint(shipped)
    # Uploaded: a sibling config, other data, and a folder whose only ignored file the data reader skips.
    submit_with("experiments/b.yaml")
    submit_with("resnet18_digits_tiny", "data.source=text/train.jsonl", "data.kind=text")
    submit_with("resnet18_digits_tiny", "data.source=photos")
    assert len(client.submitted) == 3 and {"experiments/b.yaml", "text/train.jsonl", "photos/cat/1.png"} <= shipped
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")  # Ray's switch: then no .gitignore is read
    assert "experiments/a.local.yaml" in _shipped(project)
    submit_with("experiments/a.local.yaml", "train.epochs=3")  # another config: not the first submission again
    assert len(client.submitted) == 4


def test_config_argument_preset_file_inside_and_outside(tmp_path):
    (tmp_path / "ray_jobs").mkdir()
    (tmp_path / "exp").mkdir()
    inside = tmp_path / "exp" / "a.yaml"
    inside.write_text("name: a\n")
    assert config_argument("resnet18_digits", tmp_path) == "resnet18_digits"
    assert config_argument(str(inside), tmp_path) == "exp/a.yaml"
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "c.yaml").write_text("name: c\n")
    with pytest.raises(JobsError, match="not uploaded"):
        config_argument(str(tmp_path / "runs" / "c.yaml"), tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.yaml"
    outside.write_text("name: b\n")
    with pytest.raises(JobsError, match="outside the working directory"):
        config_argument(str(outside), tmp_path)


def test_check_submission_refuses_what_cannot_work_on_a_cluster(tmp_path):
    with pytest.raises(JobsError, match="no ray_jobs/train.py"):
        check_submission("resnet18_digits", job="train", runs_dir=None, working_dir=tmp_path)
    with pytest.raises(JobsError, match="absolute path"):
        check_submission("resnet18_digits", job="train", runs_dir="runs", working_dir=REPO)
    with pytest.raises(JobsError, match="one of train, tune, pipeline"):
        check_submission("resnet18_digits", job="eval", runs_dir=None, working_dir=REPO)
    assert check_submission("resnet18_digits", job="train", runs_dir="/shared", working_dir=REPO) == (REPO, "resnet18_digits")
    # A password given with --set would be in the job's entrypoint, which Ray shows whoever lists jobs.
    with pytest.raises(JobsError, match=r"--set tracking.mlflow.tracking_uri: its value holds a password") as refused:
        check_submission("resnet18_digits", job="train", runs_dir="/shared", working_dir=REPO,
                         overrides=["train.lr=0.01", "tracking.mlflow.tracking_uri=postgresql://ml:S3CRET@db/mlflow"])
    assert "S3CRET" not in str(refused.value)
    assert check_submission("resnet18_digits", job="train", runs_dir="/shared", working_dir=REPO,
                            overrides=["tracking.mlflow.tracking_uri=http://mlflow:5000"]) == (REPO, "resnet18_digits")


def test_runtime_env_forwards_settings_but_never_secrets():
    env = runtime_env(REPO, environ={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_secret", "RAYFINE_API_KEY": "k"})
    assert env["env_vars"] == {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    assert env["working_dir"] == str(REPO)


def test_a_jobs_driver_adds_only_what_the_job_does_not_set():
    """Ray refuses a job driver's ray.init(runtime_env=...) naming an env var the job's runtime_env
    names too; a submitter whose shell sets RAY_DATA_LOG_LEVEL forwards it. Ray's own merge decides."""
    from ray._private.worker import _merge_runtime_env

    from rayfine.runtime import WORKER_ENV, worker_runtime_env

    for submitter in ({}, {"RAY_DATA_LOG_LEVEL": "INFO", "HF_HUB_OFFLINE": "1"}):
        job = runtime_env(REPO, environ=submitter)
        driver = worker_runtime_env({"PATH": "/usr/bin", **job["env_vars"]})  # the job's driver process
        merged = _merge_runtime_env(job, driver)
        assert merged is not None, (job, driver)
        assert merged["env_vars"]["RAY_DATA_LOG_LEVEL"] == submitter.get("RAY_DATA_LOG_LEVEL", WORKER_ENV["RAY_DATA_LOG_LEVEL"])


def test_the_upload_leaves_out_venv_runs_data_and_git(tmp_path):
    """Ray's own packaging (what submit_job uploads) with rayfine's excludes."""
    from ray._private.runtime_env.packaging import create_package

    files = ["ray_jobs/train.py", "src/rayfine/__init__.py", "src/rayfine/data/__init__.py", "my_exp.yaml",
             ".venv/lib/torch.so", "runs/digits/train/checkpoint/model.safetensors", "data/cats/1.jpg",
             ".git/objects/ab", "src/rayfine/__pycache__/x.cpython-311.pyc", "bench/out/fig.png", "model.safetensors"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    spec = runtime_env(tmp_path, environ={})
    target = tmp_path.parent / f"{tmp_path.name}.zip"
    create_package(spec["working_dir"], target, include_gitignore=True, excludes=spec["excludes"])
    shipped = {n.rstrip("/") for n in zipfile.ZipFile(target).namelist() if not n.endswith("/")}
    assert shipped == {"ray_jobs/train.py", "src/rayfine/__init__.py", "src/rayfine/data/__init__.py", "my_exp.yaml",
                       "model.safetensors"}


def test_token_comes_from_rays_sources_in_rays_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    token_file = tmp_path / "token"
    token_file.write_text("from-path")
    assert resolve_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(token_file)}, home) == ("from-env", "RAY_AUTH_TOKEN")
    assert resolve_token({"RAY_AUTH_TOKEN_PATH": str(token_file)}, home) == ("from-path", str(token_file))
    assert resolve_token({}, home) == ("from-home", str(home / ".ray" / "auth_token"))
    assert resolve_token({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "x"}, home)[0] is None
    assert resolve_token({}, tmp_path / "nobody")[0] is None
    with pytest.raises(JobsError, match="cannot read the token file"):  # Ray, too, refuses to fall back
        resolve_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)


def test_a_token_goes_to_another_host_only_with_ray_auth_mode_token(tmp_path):
    """A token in this shell may be another cluster's, and the Jobs API is plain HTTP: rayfine sends
    it to a loopback address (the local cluster, a port-forward) as it finds it, and to another host
    only with RAY_AUTH_MODE=token, Ray's own rule; a cluster that asks for it then says how."""
    from ray.exceptions import AuthenticationError

    from rayfine.jobs import _Translate

    env = {"RAY_AUTH_TOKEN": "secret"}
    for url in ("http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265", "https://127.0.0.5:443"):
        assert token_for(url, env, tmp_path) == ("secret", "RAY_AUTH_TOKEN"), url
    for url in ("http://head.example:8265", "http://10.0.0.5:8265", "http://localhost.example.com:8265"):
        token, why = token_for(url, env, tmp_path)
        assert token is None and "is not sent to" in why and "RAY_AUTH_MODE=token" in why, url
        assert token_for(url, {**env, "RAY_AUTH_MODE": "token"}, tmp_path) == ("secret", "RAY_AUTH_TOKEN")
    assert token_for("http://head.example:8265", {}, tmp_path / "nobody")[0] is None
    token, why = token_for("http://head.example:8265", env, tmp_path)
    with pytest.raises(JobsError) as refused, _Translate("http://head.example:8265", why):
        raise AuthenticationError("Authentication required")
    assert str(refused.value) == ("http://head.example:8265 requires a Ray auth token: the token of RAY_AUTH_TOKEN is not "
                                  "sent to head.example without RAY_AUTH_MODE=token (Ray's rule: a token goes to another "
                                  "host only when asked); set RAY_AUTH_MODE=token in this shell to send it")


def test_address_precedence():
    assert resolve_address(None, {}) == DEFAULT_ADDRESS
    assert resolve_address("10.0.0.5:8265", {}) == "http://10.0.0.5:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "10.0.0.5:6379"}) == DEFAULT_ADDRESS  # a GCS address, not the Jobs API
    assert resolve_address(None, {"RAY_ADDRESS": "http://h:8265/"}) == "http://h:8265"
    assert resolve_address(None, {"RAY_API_SERVER_ADDRESS": "https://a:443", "RAY_ADDRESS": "http://b:8265"}) == "https://a:443"
    with pytest.raises(JobsError, match="dashboard's HTTP address"):
        resolve_address("ray://head:10001", {})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rayfine(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*RAYFINE, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_unreachable_cluster_is_one_line_and_exit_1():
    address = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    for args in (["jobs", "list"], ["jobs", "status", "rayfine-x"], ["submit", "resnet18_digits_tiny", "--job", "train"]):
        result = _rayfine(*args, "--address", address)
        assert result.returncode == 1, result
        assert result.stderr.strip().splitlines() == [f"error: cannot reach the Ray Jobs API at {address}: is the "
                                                      "cluster up, and is this its dashboard address (port 8265 by default)?"]



class _StandInDashboard(http.server.BaseHTTPRequestHandler):
    """The two Jobs API routes `rayfine jobs list` calls, answered as Ray 2.60's dashboard answers them
    for a cluster without jobs; the paths asked for are kept in the server's ``seen``."""

    def do_GET(self):
        self.server.seen.append(self.path)
        self.server.authorization.append(self.headers.get("Authorization"))
        body = {"/api/version": {"version": "4", "ray_version": "2.60.0", "ray_commit": "x"}, "/api/jobs/": []}.get(self.path)
        data = json.dumps(body).encode()
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_an_address_given_wins_over_the_shells_ray_addresses():
    """Ray's JobSubmissionClient takes RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, over the address it is
    given. After `source cluster.env` (which sets both), `rayfine jobs list --address X` asked the local
    cluster; now X, as the README's order says. Without --address the shell's setting is the address."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StandInDashboard)
    server.seen, server.authorization = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        given = f"http://127.0.0.1:{server.server_address[1]}"
        elsewhere = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{_free_port()}", "RAY_ADDRESS": f"127.0.0.1:{_free_port()}"}
        result = _rayfine("jobs", "list", "--address", given, env=elsewhere)  # nothing listens elsewhere
        assert (result.returncode, result.stdout) == (0, "no jobs\n"), result
        assert set(server.seen) == {"/api/version", "/api/jobs/"}, server.seen  # it asked here
        server.authorization.clear()
        result = _rayfine("jobs", "list", "--address", given, env={**elsewhere, "RAY_AUTH_TOKEN": "t0ken"})
        assert result.returncode == 0 and set(server.authorization) == {"Bearer t0ken"}, result  # loopback: sent
        result = _rayfine("jobs", "list", env={**elsewhere, "RAY_API_SERVER_ADDRESS": given})
        assert (result.returncode, result.stdout) == (0, "no jobs\n"), result
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

def test_submit_checks_locally_before_contacting_the_cluster():
    address = f"http://127.0.0.1:{_free_port()}"
    result = _rayfine("submit", "resnet18_digits_tiny", "--job", "train", "--runs-dir", "runs", "--address", address)
    assert result.returncode == 1 and "--runs-dir runs: give an absolute path" in result.stderr
    result = _rayfine("submit", "resnet18_digits_tiny", "--job", "train", "--set", "data.source=data/pets", "--address", address)
    assert result.returncode == 1 and "data.source data/pets: data/ is not uploaded" in result.stderr
    result = _rayfine("submit", "resnet18_digits_tiny", "--job", "train", "--set",
                      "tracking.mlflow.tracking_uri=sqlite:///runs/mlflow.db", "--address", address)
    assert result.returncode == 1 and "a relative SQLite file" in result.stderr
    result = _rayfine("submit", "resnet18_digits_tiny", "--job", "train", "--set", "train.epochs=0", "--address", address)
    assert result.returncode == 2 and "train.epochs" in result.stderr


def test_jobs_logs_into_a_reader_that_went_away_ends_quietly_with_141():
    """`rayfine jobs logs ID | head -1`: a BrokenPipeError is a ConnectionError, but of this
    process's stdout, not the cluster's: no "cannot reach the Ray Jobs API", exit 141. The Jobs
    client is a fake (no cluster); the pipe is real."""
    script = """
import sys, types
import rayfine.jobs as jobs
from rayfine.cli import main

class Client:
    _address = "http://127.0.0.1:8265"
    rayfine_token_source = "test"
    def get_job_info(self, job_id):
        return types.SimpleNamespace(submission_id=job_id, status="SUCCEEDED")
    def get_job_logs(self, job_id):
        return "".join(f"[tune] trial line {i} " + "x" * 60 + "\\n" for i in range(3000))

jobs.connect = lambda address=None, environ=None: Client()
sys.exit(main(["jobs", "logs", "rayfine-pipeline-x"]))
"""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-c", script], stdout=write_end, stderr=subprocess.PIPE, text=True,
                                check=False, timeout=120)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, ""), result.stderr


def test_the_serve_job_reads_its_runs_dir_as_a_path_not_as_yaml():
    """RAYFINE_RUNS_DIR or --runs-dir of ray_jobs/serve.py is a path, as rayfine's own --runs-dir is
    read: "[2]" or "null" is a folder, not a YAML list or null (a refused config, exit 2). No run
    there: one line, exit 1, naming the path, before any Ray starts."""
    for runs in ("[2]", "null"):
        result = subprocess.run([sys.executable, "ray_jobs/serve.py", "--config", "resnet18_digits_tiny", "--runs-dir",
                                 runs], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 1, result
        assert f"error: {REPO / runs}/resnet18_digits_tiny holds no checkpoint" in result.stderr, result


def test_a_job_entrypoint_takes_debug_as_the_failure_message_says(monkeypatch, capsys):
    """A failed job says "rerun with --debug for the traceback": the entrypoints take --debug."""
    from rayfine import cli

    def boom(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_train", boom)
    assert cli.job_main("train", ["--config", "resnet18_digits_tiny"]) == cli.EXIT_FAILED
    assert "rerun with --debug" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="boom"):
        cli.job_main("train", ["--config", "resnet18_digits_tiny", "--debug"])


def test_submit_checks_once_and_before_it_connects(monkeypatch, capsys):
    """`rayfine submit` refuses what it can check without the cluster before connecting, and
    checks a submission once (the paths check walks the data folder)."""
    from rayfine import jobs
    from rayfine.cli import main

    client, connected, checked = FakeJobs(), [], []
    monkeypatch.setattr(jobs, "connect", lambda address=None: connected.append(address) or client)
    check_paths = jobs.check_paths
    monkeypatch.setattr(jobs, "check_paths", lambda *a, **k: checked.append(a) or check_paths(*a, **k))
    base = ["submit", "resnet18_digits_tiny", "--working-dir", str(REPO), "--address", "http://jobs.example:8265"]
    assert main([*base, "--runs-dir", "runs"]) != 0
    assert "--runs-dir runs: give an absolute path" in capsys.readouterr().err
    assert connected == [] and client.submitted == []
    assert main([*base, "--runs-dir", "/shared/runs"]) == 0
    assert connected == ["http://jobs.example:8265"] and len(checked) == 1 and len(client.submitted) == 1
    assert f"submitted to {client._address}" in capsys.readouterr().out
