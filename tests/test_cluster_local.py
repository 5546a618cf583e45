"""A real two-node Ray cluster on this host (cluster/local/up.sh) with token auth; a training job
submitted with `rayfine submit` whose two DDP workers must run on both nodes; the jobs commands; a
serve job (ray_jobs/serve.py) whose model answers over HTTP; down.sh stopping exactly that
cluster; a search job stopped mid-way and resumed with `rayfine submit --resume`. Integration tier,
about 4 minutes on 2 CPUs.

Run it alone under the project's Ray lock (it starts Ray; no `ray_local` fixture may run meanwhile):
    flock /tmp/rayfine-ray.lock .venv/bin/pytest -q tests/test_cluster_local.py

The tests run in file order and share the cluster; the last one stops it and checks that nothing of
it is left (the fixture stops it too, should a test fail before).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from fault_tools import another_ray
from net_tools import check_served_as_checkpoint

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
RAYFINE = [sys.executable, "-m", "rayfine.cli"]
TIMINGS: dict[str, float] = {}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env(**extra: str) -> dict:
    """This process's environment without any Ray address of another cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return {**env, **extra}


def _run(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def cluster(request):
    state = Path(tempfile.mkdtemp(prefix="rfc-", dir="/tmp"))  # short: Ray's socket paths live below it
    gcs, dashboard, client = _free_ports(3)
    env = _env(RAYFINE_CLUSTER_DIR=str(state), RAYFINE_GCS_PORT=str(gcs), RAYFINE_DASHBOARD_PORT=str(dashboard),
               RAYFINE_CLIENT_PORT=str(client))
    t0 = time.monotonic()
    up = _run(["cluster/local/up.sh", "1"], timeout=300, env=env)
    TIMINGS["up.sh"] = time.monotonic() - t0
    info = {"state": state, "env": env, "up": up, "dashboard": f"http://127.0.0.1:{dashboard}",
            "storage": state / "storage", "gcs": f"127.0.0.1:{gcs}"}
    try:
        assert up.returncode == 0, f"up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield info
    finally:
        if list((state / "nodes").glob("*.sid")):  # a test failed before test_down_stops_exactly_the_cluster
            _run(["cluster/local/down.sh"], timeout=180, env=env)
        print("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items()))
        if request.session.testsfailed == 0:
            shutil.rmtree(state, ignore_errors=True)
        else:
            print(f"cluster logs kept in {state}/nodes and the node temp dirs below {state}")


def _state_api(dashboard: str, code: str) -> object:
    """Run `code` (which sets `out`) against Ray's state API in a fresh process with token auth on."""
    script = f"import json\nfrom ray.util.state import list_actors, list_nodes\naddress = {dashboard!r}\n{code}\nprint(json.dumps(out))"
    result = _run([sys.executable, "-c", script], timeout=120, env=_env(RAY_AUTH_MODE="token"))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_up_starts_a_head_and_a_worker_node(cluster):
    out = cluster["up"].stdout
    assert cluster["dashboard"] in out and str(cluster["storage"]) in out
    nodes = _state_api(cluster["dashboard"], "out = [(n.node_id, n.state, n.is_head_node, sorted(n.resources_total)) "
                       "for n in list_nodes(address=address, detail=True)]")
    alive = [n for n in nodes if n[1] == "ALIVE"]
    assert len(alive) == 2, nodes
    head = [n for n in alive if n[2]]
    worker = [n for n in alive if not n[2]]
    assert len(head) == 1 and "rayfine_head" in head[0][3]
    assert len(worker) == 1 and "rayfine_worker1" in worker[0][3]
    cluster["node_ids"] = {n[0] for n in alive}


def test_the_jobs_api_refuses_calls_without_the_token(cluster, tmp_path):
    r = requests.get(f"{cluster['dashboard']}/api/jobs/", timeout=30)
    assert r.status_code == 401, (r.status_code, r.text)
    r = requests.get(f"{cluster['dashboard']}/api/jobs/", headers={"Authorization": "Bearer not-the-token"}, timeout=30)
    assert r.status_code == 403, (r.status_code, r.text)
    # The CLI without any token (no RAY_AUTH_*, an empty home): one line, exit 1. (RAY_AUTH_MODE
    # goes too: this process has it once any embedded Ray ran here, and with it Ray's SDK adds the
    # token file of the account's home, which $HOME does not move.)
    env = {k: v for k, v in _env(HOME=str(tmp_path)).items() if not k.startswith("RAY_AUTH_")}
    result = _run([*RAYFINE, "jobs", "list", "--address", cluster["dashboard"]], timeout=120, env=env)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "requires a Ray auth token" in result.stderr, result.stderr


# The pipeline job on the tiny preset: one one-epoch trial, a 2-worker DDP run whose workers
# (0.6 CPU each) cannot share a 1-CPU node, then the winner served on the cluster. What is checked
# here is the job on a cluster (both nodes, the shared storage, serving after the job ends); a
# search of several trials and ASHA's stopping are tests/test_tune.py's, so one trial and fifo.
PIPELINE_SETS = ["--set", "tune.num_samples=1", "--set", "tune.scheduler=fifo", "--set",
                 "tune.trial_overrides=[train.epochs=1, scaling.num_workers=2, scaling.cpus_per_worker=0.6, scaling.data_cpus=0.25]",
                 "--set", "serve.cpus_per_replica=0.3"]


def test_submit_the_pipeline_job_with_workers_on_both_nodes(cluster, digits, tmp_path):
    from PIL import Image

    runs = cluster["storage"] / "runs"
    cluster["port"] = port = _free_ports(1)[0]
    cluster["sets"] = sets = [*PIPELINE_SETS, "--set", f"serve.port={port}"]
    t0 = time.monotonic()
    result = _run([*RAYFINE, "submit", "resnet18_digits_tiny", "--job", "pipeline", *sets,
                   "--runs-dir", str(runs), "--address", cluster["dashboard"], "--follow"], timeout=900, env=_env())
    TIMINGS["submit --follow (pipeline job)"] = time.monotonic() - t0
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    job_id = re.search(r"\[submit\] (rayfine-pipeline-resnet18_digits_tiny-[0-9a-f]{12}) submitted", result.stdout).group(1)
    assert f"[job] {job_id} SUCCEEDED" in result.stdout
    # The job's own output, streamed while it ran: the search, the winner, the deploy.
    assert "[run] winner test accuracy" in result.stdout and f"at http://127.0.0.1:{port}" in result.stdout
    cluster["job_id"] = job_id
    # The run directory landed on the shared storage: the search and its evaluated winner.
    run = runs / "resnet18_digits_tiny"
    summary = json.loads((run / "tune" / "summary.json").read_text())
    assert summary["num_trials"] == 1 and summary["best"]["test_accuracy"] > 0
    assert (run / "tune" / "best" / "checkpoint" / "model.safetensors").is_file()
    # The served endpoint answers, after the job has ended: the app lives on the cluster.
    images, _ = digits
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(images[i]).save(paths[-1])
    answer = _run([*RAYFINE, "predict", f"http://127.0.0.1:{port}", *map(str, paths), "--json"], timeout=120, env=_env())
    assert answer.returncode == 0, answer.stderr
    predictions = json.loads(answer.stdout)
    assert predictions["model_name"] == "resnet18_digits_tiny" and len(predictions["predictions"]) == 3
    # ... each digit as the winner's checkpoint on the shared storage answers it in this process.
    check_served_as_checkpoint(predictions["predictions"], run / "tune" / "best" / "checkpoint", [p.read_bytes() for p in paths])
    cluster["served"] = predictions  # what the serve job below must leave as it is
    # Ray's state API: the job's training workers (RayTrainWorker actors) ran on both nodes.
    workers = _state_api(cluster["dashboard"], f"""
from ray.job_submission import JobSubmissionClient
ray_job = JobSubmissionClient(address).get_job_info({job_id!r}).job_id
out = [(a.node_id, a.state) for a in list_actors(address=address, detail=True, limit=10000,
       filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", ray_job)])]""")
    assert len(workers) >= 2, workers
    # The trial's training workers spread over both nodes.
    assert {node for node, _ in workers} == cluster["node_ids"], (workers, cluster["node_ids"])


def test_jobs_commands_and_resubmission(cluster):
    job_id, address = cluster["job_id"], cluster["dashboard"]
    listing = _run([*RAYFINE, "jobs", "list", "--address", address], timeout=120, env=_env())
    assert listing.returncode == 0 and re.search(rf"{job_id}\s+SUCCEEDED", listing.stdout), listing
    status = _run([*RAYFINE, "jobs", "status", job_id, "--address", address], timeout=120, env=_env())
    assert status.returncode == 0 and status.stdout.startswith(f"{job_id}: SUCCEEDED"), status
    logs = _run([*RAYFINE, "jobs", "logs", job_id, "--address", address], timeout=120, env=_env())
    assert logs.returncode == 0 and "[run] winner test accuracy" in logs.stdout
    # The same job and config again: recognised by its submission id, nothing new runs.
    again = _run([*RAYFINE, "submit", "resnet18_digits_tiny", "--job", "pipeline", *cluster["sets"],
                  "--runs-dir", str(cluster["storage"] / "runs"), "--address", address], timeout=120, env=_env())
    assert again.returncode == 0 and f"{job_id} was already submitted" in again.stdout and "SUCCEEDED" in again.stdout
    relisting = _run([*RAYFINE, "jobs", "list", "--address", address], timeout=120, env=_env())
    assert len(relisting.stdout.splitlines()) == len(listing.stdout.splitlines())
    stop = _run([*RAYFINE, "jobs", "stop", job_id, "--address", address], timeout=120, env=_env())
    assert stop.returncode == 0 and "had already ended: SUCCEEDED" in stop.stdout
    missing = _run([*RAYFINE, "jobs", "status", "rayfine-no-such-job", "--address", address], timeout=120, env=_env())
    assert missing.returncode == 1 and "no such job" in missing.stderr


def test_the_serve_job_on_a_served_run_changes_nothing(cluster, tmp_path, digits):
    """ray_jobs/serve.py as a Ray job, for the run the pipeline already serves with the same
    settings: recognised as the served version; the model keeps answering over HTTP."""
    from PIL import Image

    from rayfine.jobs import connect, follow, runtime_env

    port = cluster["port"]
    client = connect(cluster["dashboard"])
    job_id = client.submit_job(
        entrypoint=f"python ray_jobs/serve.py --config resnet18_digits_tiny --set serve.port={port} "
                   f"--set serve.cpus_per_replica=0.3 --runs-dir {cluster['storage'] / 'runs'}",
        runtime_env=runtime_env(REPO))
    t0 = time.monotonic()
    output = io.StringIO()
    assert follow(client, job_id, out=output) == "SUCCEEDED", output.getvalue()[-3000:]
    TIMINGS["serve job"] = time.monotonic() - t0
    assert "already serves version" in output.getvalue(), output.getvalue()[-3000:]
    images, labels = digits
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(images[i]).save(paths[-1])
    result = _run([*RAYFINE, "predict", f"http://127.0.0.1:{port}", *map(str, paths), "--json"], timeout=120, env=_env())
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["model_name"] == "resnet18_digits_tiny" and len(answer["predictions"]) == 3
    # The same version answers the same digits as before the job.
    before = cluster["served"]
    assert answer["model_version"] == before["model_version"]
    assert [p["label"] for p in answer["predictions"]] == [p["label"] for p in before["predictions"]]
    assert [p["score"] for p in answer["predictions"]] == pytest.approx([p["score"] for p in before["predictions"]], abs=1e-6)


def test_a_stopped_search_job_is_resumed_with_submit_resume(cluster):
    """A tune job stopped mid-search (`rayfine jobs stop`, as a head restart or a deadline would end
    its driver): the same submission again is refused, with a hint naming --resume; `rayfine submit
    --resume` runs the job with --resume under an id of its own and finishes the search on the
    shared storage. Another Ray runs on this host until the stop, and the stopped job leaves no Ray
    Train placement-group cleaner behind. One trial: a search resumed with trials yet to start, and
    trials a scheduler stopped, are tests/test_tune_resume.py's; what is checked here is the job."""
    address, runs = cluster["dashboard"], cluster["storage"] / "runs"
    submit = [*RAYFINE, "submit", "resnet18_digits_tiny", "--job", "tune", "--set", "name=stopped_search",
              "--set", "data.subsample=0.2", "--set", "tune.num_samples=1", "--set", "tune.scheduler=fifo", "--set",
              "tune.trial_overrides=[train.epochs=4, scaling.num_workers=1, scaling.cpus_per_worker=0.6, scaling.data_cpus=0.25]",
              "--runs-dir", str(runs), "--address", address]
    # Another Ray on this host all along (a user's embedded rayfine run): the cluster's processes still
    # find their own State API (up.sh names it), so Ray Train's placement-group cleaner, a detached
    # actor that asks it every second, sees the stopped trial's controller die and ends. Before, it
    # met "Found multiple active Ray instances", stopped watching, and stayed alive for good. (Ray
    # caches the GCS processes it found: the other Ray must be up before the trials start.)
    with another_ray():
        t0 = time.monotonic()
        first = _run(submit, timeout=120, env=_env())
        assert first.returncode == 0, first.stderr
        job_id = re.search(r"\[submit\] (rayfine-tune-stopped_search-[0-9a-f]{12}) submitted", first.stdout).group(1)
        trials = runs / "stopped_search" / "ray" / "trials"

        def epochs() -> dict[str, list[int]]:  # each trial's epoch log, written as each epoch ends
            return {log.parent.name: [json.loads(line)["epoch"] for line in log.read_text().splitlines() if line.strip()]
                    for log in trials.glob("trial_*/epochs.jsonl")}

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not any(1 <= len(e) < 4 for e in epochs().values()):
            time.sleep(0.5)
        assert any(1 <= len(e) < 4 for e in epochs().values()), f"no trial was seen part-way: {epochs()}"
        stop = _run([*RAYFINE, "jobs", "stop", job_id, "--address", address], timeout=120, env=_env())
        assert stop.returncode == 0 and stop.stdout.strip().endswith("STOPPED"), stop
        stopped_at = epochs()
        assert [len(e) < 4 for e in stopped_at.values()] == [True], f"the trial was not stopped part-way: {stopped_at}"
        deadline, cleaners = time.monotonic() + 60, None
        while cleaners != [] and time.monotonic() < deadline:
            cleaners = _state_api(address, """out = [a.actor_id for a in list_actors(address=address, limit=10000,
           filters=[("class_name", "=", "PlacementGroupCleaner"), ("state", "=", "ALIVE")])]""")
        assert cleaners == [], f"placement-group cleaners still alive 60 s after the stop: {cleaners}"
    again = _run(submit, timeout=120, env=_env())
    assert again.returncode == 1 and f"{job_id} was already submitted" in again.stdout and "STOPPED" in again.stdout
    assert "to continue its search, submit it again with --resume" in again.stderr, again.stderr
    resumed = _run([*submit, "--resume", "--follow"], timeout=900, env=_env())
    TIMINGS["stopped and resumed search job"] = time.monotonic() - t0
    assert resumed.returncode == 0, f"{resumed.stdout[-4000:]}\n{resumed.stderr[-2000:]}"
    assert f"[submit] {job_id}-resume submitted" in resumed.stdout and f"[job] {job_id}-resume SUCCEEDED" in resumed.stdout
    assert "[tune] resuming the search in" in resumed.stdout
    summary = json.loads((runs / "stopped_search" / "tune" / "summary.json").read_text())
    assert summary["num_trials"] == 1 and summary["resumed"] and summary["best"]["test_accuracy"] > 0
    # Every epoch trained once: the stopped trial continued from its checkpoint.
    assert list(epochs().values()) == [[1, 2, 3, 4]], (stopped_at, epochs())


def test_down_stops_exactly_the_cluster(cluster):
    state, env = cluster["state"], cluster["env"]
    recorded = [int(p) for f in (state / "nodes").glob("*.pids") for p in f.read_text().split()]
    marker = f"RAYFINE_LOCAL_CLUSTER_ID={(state / 'cluster.id').read_text().strip()}\0".encode()
    assert len(recorded) >= 10 and all(_alive(p) for p in recorded)
    # A bystander in the same directory that up.sh did not start must survive.
    bystander = subprocess.Popen(["sleep", "600"], cwd=state, start_new_session=True)
    try:
        t0 = time.monotonic()
        down = _run(["cluster/local/down.sh"], timeout=180, env=env)
        TIMINGS["down.sh"] = time.monotonic() - t0
        assert down.returncode == 0, f"{down.stdout}\n{down.stderr}"
        assert [p for p in recorded if _alive(p)] == []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                assert marker not in environ.read_bytes() or not _alive(int(environ.parent.name)), environ  # a process of the cluster
            except OSError:
                pass
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{cluster['dashboard']}/api/version", timeout=10)
        assert bystander.poll() is None, "down.sh stopped a process it did not start"
    finally:
        bystander.send_signal(signal.SIGTERM)
        bystander.wait(timeout=30)
