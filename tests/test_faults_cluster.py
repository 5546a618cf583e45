"""Faults on a real multi-node cluster on this host (cluster/local/up.sh: a head and 2 worker
nodes, token auth): the dashboard and Jobs API refuse callers without the token and listen on
loopback; a worker node stopped (every process of it SIGKILLed, as a lost machine) in the middle of
a `rayfine tune` job: its trials recover on the surviving node and the search completes
(marked ``faults`` and ``integration``).

Run it alone under the project's Ray lock (it starts Ray; no other Ray may run meanwhile):
    flock /tmp/rayfine-ray.lock .venv/bin/pytest -q tests/test_faults_cluster.py
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from fault_tools import REPO, listeners, record, session_pids
from net_tools import free_port

pytestmark = [pytest.mark.faults, pytest.mark.integration]

RAYFINE = [sys.executable, "-m", "rayfine.cli"]
# Four epochs, where the tiny preset's trials train three: Tune starts the second trial a few
# seconds after the first, and with 3 epochs of ~2 s the first could finish within 0.1 s of the
# second's first epoch, leaving no moment at which both were part-way (seen once).
TRIAL_EPOCHS = 4
# The head runs the job's driver and no trial work (0 CPUs): every trial runs on the 2 worker
# nodes (1 CPU each, 2 trials at once), so stopping one takes trials with it. Ray declares a node
# dead after health_check_failure_threshold missed checks, health_check_period_ms apart: tightened
# from 5 x 3 s so the test waits seconds, not half a minute.
CLUSTER_ENV = {"RAYFINE_HEAD_CPUS": "0", "RAYFINE_WORKER_CPUS": "1",
               "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return {**env, **extra}


def _run(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False, **kw)


@pytest.fixture(scope="module")
def cluster(request):
    state = Path(tempfile.mkdtemp(prefix="rff-", dir="/tmp"))  # short: Ray's socket paths live below it
    gcs, dashboard, client = free_port(), free_port(), free_port()
    env = _env(RAYFINE_CLUSTER_DIR=str(state), RAYFINE_GCS_PORT=str(gcs), RAYFINE_DASHBOARD_PORT=str(dashboard),
               RAYFINE_CLIENT_PORT=str(client), **CLUSTER_ENV)
    t0 = time.monotonic()
    up = _run(["cluster/local/up.sh", "2"], timeout=300, env=env)
    info = {"state": state, "env": env, "dashboard": f"http://127.0.0.1:{dashboard}", "dashboard_port": dashboard,
            "storage": state / "storage", "up_s": time.monotonic() - t0}
    try:
        assert up.returncode == 0, f"up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield info
    finally:
        down = _run(["cluster/local/down.sh"], timeout=180, env=env)
        assert down.returncode == 0, f"{down.stdout}\n{down.stderr}"
        if request.session.testsfailed == 0:
            shutil.rmtree(state, ignore_errors=True)
        else:
            print(f"cluster logs kept in {state}/nodes")


def _node_pids(state: Path, node: str) -> set[int]:
    return set(session_pids(int((state / "nodes" / f"{node}.sid").read_text())))


def _state_api(dashboard: str, code: str) -> object:
    """Run ``code`` (which sets ``out``) against Ray's state API in a fresh process, with the token."""
    script = f"import json\nfrom ray.util.state import list_actors, list_nodes\naddress = {dashboard!r}\n{code}\nprint(json.dumps(out))"
    result = _run([sys.executable, "-c", script], timeout=120, env=_env(RAY_AUTH_MODE="token"))
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _token_headers() -> dict:
    token = os.environ.get("RAY_AUTH_TOKEN") or Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).read_text().strip()
    return {"Authorization": f"Bearer {token}"}


# --- 7. the dashboard and the Jobs API want the token, and listen on loopback -------------------

DASHBOARD_ROUTES = ["/api/jobs/", "/api/v0/actors", "/api/v0/nodes", "/api/v0/tasks", "/nodes?view=summary",
                    "/api/cluster_status", "/logical/actors", "/api/serve/applications/", "/api/v0/logs"]


def test_dashboard_and_jobs_api_refuse_callers_without_the_token(cluster):
    base, token = cluster["dashboard"], _token_headers()
    results = {}
    for route in DASHBOARD_ROUTES:
        results[route] = [requests.get(base + route, timeout=30).status_code,
                          requests.get(base + route, headers={"Authorization": "Bearer not-the-token"}, timeout=30).status_code,
                          requests.get(base + route, headers=token, timeout=30).status_code]
    # Submitting a job (running code on the cluster) without the token, and with a wrong one.
    marker = cluster["state"] / "pwned"
    payload = {"entrypoint": f"touch {marker}"}
    submit = [requests.post(base + "/api/jobs/", json=payload, timeout=30).status_code,
              requests.post(base + "/api/jobs/", json=payload, headers={"Authorization": "Bearer x"}, timeout=30).status_code]
    time.sleep(2)
    assert not marker.exists(), "a job ran without the token"
    assert submit[0] == 401 and submit[1] in (401, 403), submit
    for route, (none, wrong, good) in results.items():
        assert none == 401 and wrong in (401, 403), (route, results[route])
        assert good != 401 and good != 403, (route, results[route])  # the token gets through

    # Every HTTP server of the cluster that a browser or client talks to binds loopback.
    pids = set()
    for sid_file in (cluster["state"] / "nodes").glob("*.sid"):
        pids |= set(session_pids(int(sid_file.read_text())))
    sockets = listeners(pids)
    dashboard = [s for s in sockets if s["port"] == cluster["dashboard_port"]]
    assert dashboard and all(s["ip"] == "127.0.0.1" for s in dashboard), dashboard
    wildcard = sorted({(s["name"], s["port"]) for s in sockets if s["ip"] in ("0.0.0.0", "::")})
    record("cluster_token_auth", {
        "routes_no_token_wrong_token_token": results, "job_submit_no_token_wrong_token": submit,
        "dashboard": sorted({f"{s['ip']}:{s['port']}" for s in dashboard}),
        "ray_internal_on_all_interfaces": len(wildcard),
        "ray_internal_on_all_interfaces_names": sorted({name for name, _ in wildcard}),
    })


# --- 5. a worker node stopped during a search -----------------------------------------------------


def _trial_epochs(run: Path) -> dict[str, list[int]]:
    out = {}
    for log in sorted((run / "ray" / "trials").glob("trial_*/epochs.jsonl")):
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        out[log.parent.name.removeprefix("trial_")] = [int(m["epoch"]) for m in lines]
    return out


def _tune_failures(experiment: Path) -> dict[str, int]:
    """Tune's count of failures per trial (each one restarted the trial)."""
    states = sorted(experiment.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    data = json.loads(states[-1].read_text())
    return {json.loads(t)["trial_id"]: int(json.loads(t).get("num_failures", 0)) for t, _ in data["trial_data"]}


def _kill_node(state: Path, node: str) -> list[int]:
    """SIGKILL every process of a node (its session and their descendants): a lost machine."""
    pids = _node_pids(state, node)
    import psutil

    for pid in list(pids):
        try:
            pids |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(pids)


def test_worker_node_stopped_mid_search_its_trials_recover_elsewhere(cluster):
    runs = cluster["storage"] / "runs"
    run = runs / "nodeloss"
    nodes = {n[0]: n[1] for n in _state_api(cluster["dashboard"], "out = [(n.node_id, [r for r in n.resources_total "
                                            "if r.startswith('rayfine_')][0]) for n in list_nodes(address=address, detail=True) "
                                            "if n.state == 'ALIVE']")}
    assert sorted(nodes.values()) == ["rayfine_head", "rayfine_worker1", "rayfine_worker2"], nodes
    log_path = cluster["state"] / "job.log"
    args = [*RAYFINE, "submit", "resnet18_digits_tiny", "--job", "tune", "--set", "name=nodeloss",
            "--set", "tune.num_samples=2", "--set", "tune.scheduler=fifo", "--set", "data.subsample=0.2",
            "--set", "tune.search_space.train.batch_size={choice: [32]}", "--set",
            (f"tune.trial_overrides=[train.epochs={TRIAL_EPOCHS}, scaling.num_workers=1, scaling.cpus_per_worker=0.5, "
             "scaling.data_cpus=0.25]"), "--runs-dir", str(runs), "--address", cluster["dashboard"], "--follow"]
    with log_path.open("w") as log:
        job = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=_env(PYTHONUNBUFFERED="1"))
    try:
        # Wait until both trials have reported an epoch (so each has a checkpoint) and neither has
        # finished, and find a worker node their training workers run on: whichever node is
        # stopped, the trial on it must continue from its checkpoint.
        victim = None
        deadline = time.monotonic() + 600
        while victim is None and time.monotonic() < deadline and job.poll() is None:
            epochs = _trial_epochs(run)
            partway = [t for t, e in epochs.items() if 1 <= len(e) < TRIAL_EPOCHS]
            if len(partway) == 2:
                alive = _state_api(cluster["dashboard"], "out = [a.node_id for a in list_actors(address=address, detail=True, "
                                   "filters=[('class_name', '=', 'RayTrainWorker'), ('state', '=', 'ALIVE')])]")
                on_workers = [nodes[n] for n in alive if nodes.get(n, "").startswith("rayfine_worker")]
                if on_workers:
                    victim = max(set(on_workers), key=on_workers.count).removeprefix("rayfine_")
                    break
            time.sleep(0.2)
        assert victim, "no two trials were seen part-way on the worker nodes:\n" + log_path.read_text()[-3000:]
        before = _trial_epochs(run)
        killed_at = time.monotonic()
        killed = _kill_node(cluster["state"], victim)
        # Recovered: each trial that was part-way reports its next epoch.
        hit = [t for t, e in before.items() if len(e) < TRIAL_EPOCHS]
        recovered: dict[str, float] = {}
        deadline = time.monotonic() + 900
        while job.poll() is None and time.monotonic() < deadline:
            now = _trial_epochs(run)
            for t in hit:
                if t not in recovered and len(now.get(t, [])) > len(before[t]):
                    recovered[t] = time.monotonic() - killed_at
            time.sleep(0.5)
        code = job.wait(timeout=60)
        job_s = time.monotonic() - killed_at
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    text = log_path.read_text()
    assert code == 0, text[-4000:]
    assert re.search(r"\[job\] rayfine-tune-nodeloss-[0-9a-f]{12} SUCCEEDED", text), text[-2000:]

    after = _trial_epochs(run)
    assert len(after) == 2
    assert hit and sorted(recovered) == sorted(hit), (hit, recovered)  # each part-way trial went on
    for trial_id, epochs in after.items():
        # Every trial trained every epoch, each reported once: those hit by the lost node continued
        # from their last checkpoint (a restart from scratch would report epoch 1 again).
        assert epochs == list(range(1, TRIAL_EPOCHS + 1)), (trial_id, before.get(trial_id), epochs)
    with (run / "tune" / "trials.csv").open() as f:
        assert {r["status"] for r in csv.DictReader(f)} == {"completed"}
    summary = json.loads((run / "tune" / "summary.json").read_text())
    assert summary["num_trials"] == 2 and summary["best"]["test_accuracy"] > 0
    # The node is gone for good; the work that was on it now ran on the surviving worker node.
    alive_nodes = _state_api(cluster["dashboard"], "out = [n.node_id for n in list_nodes(address=address, detail=True) "
                             "if n.state == 'ALIVE']")
    assert {nodes[n] for n in alive_nodes} == {"rayfine_head", "rayfine_worker1", "rayfine_worker2"} - {f"rayfine_{victim}"}
    failures = _tune_failures(run / "ray" / "tune")
    record("cluster_node_stopped", {
        "cluster": "head (0 CPUs, runs the job driver) + 2 worker nodes of 1 CPU on 127.0.0.1, token auth",
        "stopped": f"{victim}: SIGKILL of all {len(killed)} of its processes, part-way through the search",
        "trials": len(after), "trials_part_way_when_stopped": len(hit),
        "epochs_before_stop": before, "epochs_after": after,
        "tune_trial_restarts": failures,
        "recovery_s": {t: round(s, 1) for t, s in recovered.items()},
        "job_s_after_stop": round(job_s, 1),
        "all_trials_completed": True,
    })
