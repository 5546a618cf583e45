"""A search whose driver is SIGKILLed mid-way, then resumed with `rayfine tune --resume`
(integration tier: real `rayfine tune` processes, each with its own embedded Ray).

Each driver runs in a session of its own (start_new_session) with its own Ray temp dir, so the
test can find and stop exactly the processes it started: everything in that session.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from fault_tools import session_pids, start_cli, stop_session

pytestmark = pytest.mark.integration

EPOCHS = 3
TRIALS = 3  # two run at once: one finishes while another is part-way


def start_driver(args: list[str], ray_tmp: str, log_path: Path) -> subprocess.Popen:
    return start_cli(["tune", *args], log_path, ray_tmp=ray_tmp)


def trial_epochs(run: Path) -> dict[str, list[int]]:
    """Epochs each trial's Train run reported, in order (its epoch log, written as each ends)."""
    return {
        log.parent.name.removeprefix("trial_"): [json.loads(line)["epoch"] for line in log.read_text().splitlines() if line.strip()]
        for log in sorted((run / "ray" / "trials").glob("trial_*/epochs.jsonl"))
    }


def trial_statuses(experiment: Path) -> dict[str, str]:
    """Tune's own record of each trial (the experiment state it saves while it runs)."""
    states = sorted(experiment.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # being rewritten
    out = {}
    for trial_json, _ in data["trial_data"]:
        trial = json.loads(trial_json)
        out[trial["trial_id"]] = trial["status"]
    return out


@pytest.fixture
def ray_tmp():
    """The drivers' Ray temp dir: short, since Ray's socket paths have a length limit."""
    path = tempfile.mkdtemp(prefix="rf-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_killed_search_resumes_without_running_a_finished_trial_again(tmp_path, ray_tmp):
    args = ["resnet18_digits_tiny", "--runs-dir", str(tmp_path), "--set", "name=killed",
            "--set", "tune.scheduler=fifo", "--set", "tune.searcher=optuna", "--set", f"tune.num_samples={TRIALS}"]
    run = tmp_path / "killed"
    experiment = run / "ray" / "tune"
    log_path = tmp_path / "drivers.log"

    driver = start_driver(args, ray_tmp, log_path)
    finished_before: dict[str, list[int]] = {}
    try:
        # Kill once Tune has recorded a finished trial while another one is part-way through.
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None:
            statuses, epochs = trial_statuses(experiment), trial_epochs(run)
            done = [t for t, s in statuses.items() if s == "TERMINATED"]
            partway = [t for t, s in statuses.items() if s == "RUNNING" and 0 < len(epochs.get(t, [])) < EPOCHS]
            if done and partway:
                finished_before = {t: epochs[t] for t in done}
                tune_records = {t: (experiment / t / "result.json").read_bytes() for t in done}
                break
            time.sleep(0.5)
        assert driver.poll() is None, "the search ended before it could be killed:\n" + log_path.read_text()[-3000:]
        assert finished_before, "no point with a finished and a running trial was seen:\n" + log_path.read_text()[-3000:]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        left_running = stop_session(driver.pid)
    # Seen here: the embedded Ray's DashboardAgent and RuntimeEnvAgent outlive a SIGKILLed driver.
    print(f"processes of the killed driver's session still running 5 s after the kill: {left_running}")
    assert not session_pids(driver.pid)
    before = trial_epochs(run)
    assert len(before) < TRIALS or any(len(e) < EPOCHS for e in before.values())  # it really was mid-way

    resumed = start_driver([*args, "--resume"], ray_tmp, log_path)
    try:
        assert resumed.wait(timeout=900) == 0, log_path.read_text()[-3000:]
    finally:
        if resumed.poll() is None:
            resumed.kill()
            resumed.wait()
        stop_session(resumed.pid)
    assert not session_pids(resumed.pid)
    log = log_path.read_text()
    assert "[tune] resuming the search in" in log
    leaderboard = log.rsplit("[tune] leaderboard", 1)[1]

    after = trial_epochs(run)
    assert len(after) == TRIALS
    # The resumed driver's leaderboard has every trial, those finished before the kill included.
    assert all(trial_id in leaderboard for trial_id in after)
    for trial_id, epochs in finished_before.items():
        assert after[trial_id] == epochs == [1, 2, 3], f"finished trial {trial_id} trained again after the resume"
        # Tune did not start it again either (a restarted trial gets a fresh result.json).
        assert (experiment / trial_id / "result.json").read_bytes() == tune_records[trial_id]
    for trial_id, epochs in after.items():
        # Every trial trained each epoch once: unfinished ones continued from their checkpoint
        # (a restart from scratch would report epoch 1 again).
        assert epochs == [1, 2, 3], (trial_id, before.get(trial_id), epochs)
        assert before.get(trial_id, []) == epochs[: len(before.get(trial_id, []))]

    with (run / "tune" / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["trial_id"], int(r["epoch"])) for r in rows) == sorted(
        (t, e) for t in after for e in range(1, EPOCHS + 1))
    assert {r["status"] for r in rows} == {"completed"}
    summary = json.loads((run / "tune" / "summary.json").read_text())
    assert summary["resumed"] is True and summary["num_trials"] == TRIALS
    assert summary["epochs_run"] == summary["epochs_full_budget"] == TRIALS * EPOCHS  # fifo: every trial runs to the end
    assert (run / "tune" / "best" / "checkpoint" / "model.safetensors").is_file()
    assert json.loads((run / "tune" / "best" / "eval.json").read_text())["accuracy"] == summary["best"]["test_accuracy"]
