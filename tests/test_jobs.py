"""rayfine.jobs without a cluster: submission ids, entrypoints, what the working_dir upload holds
(through Ray's own packaging code), where the token and the address come from, and the one-line
errors of `rayfine submit` / `rayfine jobs`. The cluster side is tests/test_cluster_local.py."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

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


def test_submit_checks_locally_before_contacting_the_cluster():
    address = f"http://127.0.0.1:{_free_port()}"
    result = _rayfine("submit", "resnet18_digits_tiny", "--job", "train", "--runs-dir", "runs", "--address", address)
    assert result.returncode == 1 and "--runs-dir runs: give an absolute path" in result.stderr
    result = _rayfine("submit", "resnet18_digits_tiny", "--job", "train", "--set", "data.source=data/pets", "--address", address)
    assert result.returncode == 1 and "data.source data/pets: data/ is not uploaded" in result.stderr
    result = _rayfine("submit", "resnet18_digits_tiny", "--job", "train", "--set", "train.epochs=0", "--address", address)
    assert result.returncode == 2 and "train.epochs" in result.stderr
