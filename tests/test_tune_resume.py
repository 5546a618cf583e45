"""A search stopped mid-way (Ctrl-C, or its driver SIGKILLed), then resumed with `rayfine tune --resume`
(integration tier: real `rayfine tune` processes, each with its own embedded Ray).

Each driver runs in a session of its own (start_new_session) with its own Ray temp dir, so the
test can find and stop exactly the processes it started: everything in that session.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from fault_tools import session_pids, start_cli, stop_session
from net_tools import wait_for

pytestmark = pytest.mark.integration

EPOCHS = 3
TRIALS = 3  # two run at once: one finishes while another is part-way
# Half the tiny preset's data (240 training images) in batches of 32: these tests are about what
# the search does across a stop and a resume, and 2 CPUs pay for every epoch twice over.
SMALL = ["--set", "data.subsample=0.2", "--set", "tune.search_space.train.batch_size={choice: [32]}"]


def start_driver(args: list[str], ray_tmp: str, log_path: Path) -> subprocess.Popen:
    return start_cli(["tune", *args], log_path, ray_tmp=ray_tmp)


def sigkill(driver: subprocess.Popen) -> list[int]:
    """SIGKILL a driver, then end what is left of its session; the pids that outlived it."""
    try:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        left = stop_session(driver.pid)
    assert not session_pids(driver.pid)
    return left


def expect_exit(driver: subprocess.Popen, code: int, timeout_s: float, log_path: Path) -> None:
    """Wait for the driver to exit with ``code`` (killed if it does not), then end what is left of its session."""
    try:
        assert driver.wait(timeout=timeout_s) == code, log_path.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        stop_session(driver.pid)
    assert not session_pids(driver.pid)


def ctrl_c(driver: subprocess.Popen, log_path: Path) -> None:
    """SIGINT to the driver alone, as Ctrl-C in its terminal: it must stop the search, save it and
    exit 130 without a winner."""
    with contextlib.suppress(ProcessLookupError):  # gone already: its exit code tells
        os.kill(driver.pid, signal.SIGINT)
    expect_exit(driver, 130, 180, log_path)


def resume_to_the_end(args: list[str], ray_tmp: str, log_path: Path) -> None:
    """`rayfine tune ARGS --resume`, which must finish the search and exit 0."""
    expect_exit(start_driver([*args, "--resume"], ray_tmp, log_path), 0, 900, log_path)


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


def test_interrupted_search_resumes_without_running_a_finished_trial_again(tmp_path, ray_tmp):
    """Ctrl-C part-way: Tune stops its loop without raising; rayfine must not take the best trial
    so far for the search's result (no leaderboard, summary or winner, nothing to deploy)."""
    args = ["resnet18_digits_tiny", "--runs-dir", str(tmp_path), "--set", "name=killed",
            "--set", "tune.scheduler=fifo", "--set", "tune.searcher=optuna", "--set", f"tune.num_samples={TRIALS}", *SMALL]
    run = tmp_path / "killed"
    experiment = run / "ray" / "tune"
    log_path = tmp_path / "drivers.log"

    driver = start_driver(args, ray_tmp, log_path)
    finished_before: dict[str, list[int]] = {}
    try:
        # A --resume while the search still runs is refused before its Ray starts (rayfine.rundir):
        # the two drivers would run the same trials from the same checkpoints.
        wait_for(lambda: trial_statuses(experiment) or driver.poll() is not None, 300, 0.5, "the search's first save")
        assert driver.poll() is None, log_path.read_text()[-3000:]
        early_log = tmp_path / "early_resume.log"
        expect_exit(start_driver([*args, "--resume"], ray_tmp, early_log), 1, 120, early_log)
        assert f"error: {run} is in use by another rayfine train, tune or run command" in early_log.read_text()
        assert "[ray]" not in early_log.read_text() and driver.poll() is None
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
    finally:
        ctrl_c(driver, log_path)
    interrupted = log_path.read_text()
    assert re.search(r"\[tune\] interrupted; the search is saved in .*: continue it with --resume", interrupted), interrupted[-3000:]
    assert "[tune] leaderboard" not in interrupted and "interrupted" in interrupted.splitlines()  # the CLI's last word
    assert not (run / "tune" / "summary.json").exists() and not (run / "tune" / "best").exists()
    before = trial_epochs(run)
    assert len(before) < TRIALS or any(len(e) < EPOCHS for e in before.values())  # it really was mid-way

    resume_to_the_end(args, ray_tmp, log_path)
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


GOOD_LR, WEAK_LR = 3.0e-3, 1.0e-6  # as in test_tune: the weak rates barely move in one epoch


def most_training_at_once(log: str) -> int:
    """From a driver's plain progress lines: the most trials training at the same time."""
    running, peak = set(), 0
    for line in log.splitlines():
        words = line.split()
        if len(words) > 2 and words[0] == "[tune]" and words[2] in ("started", "resumed"):
            running.add(words[1])
            peak = max(peak, len(running))
        elif len(words) > 2 and words[0] == "[tune]" and words[2] in ("completed;", "stopped", "failed", "paused"):
            running.discard(words[1])
    return peak


def test_killed_halving_search_resumes_at_its_rung(tmp_path, ray_tmp):
    """tune.scheduler=halving, 3 trials, two at a time: at the rung (epoch 1) the best 3 // 3 = 1 goes
    on to epoch 3. The good learning rate is drawn first, so it reaches the rung before the third
    trial starts and waits there, paused. The driver is SIGKILLed then; the resumed driver rebuilds
    the rung from the trials' epoch logs, finishes it, and resumes the good trial from its
    checkpoint: every epoch trains once, as in a search that was never stopped."""
    lrs = [GOOD_LR, WEAK_LR, WEAK_LR / 10]
    args = ["resnet18_digits_tiny", "--runs-dir", str(tmp_path), "--set", "name=halving",
            "--set", "tune.scheduler=halving", "--set", "tune.reduction_factor=3", "--set", "tune.num_samples=1",
            "--set", f"tune.search_space.train.lr={{grid: [{', '.join(map(str, lrs))}]}}", *SMALL]
    run = tmp_path / "halving"
    log_path = tmp_path / "drivers.log"

    driver = start_driver(args, ray_tmp, log_path)
    paused: list[str] = []
    try:
        # Kill as soon as the first two trials wait at the rung (epoch 1) for the third: Tune may
        # not have saved their PAUSED status yet, and the resumed search must work it out from the
        # trials' epoch logs.
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None:
            paused = sorted(set(re.findall(r"\[tune\] (\S+) paused after epoch 1/3", log_path.read_text())))
            if len(paused) == 2:
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the search ended before it could be killed:\n" + log_path.read_text()[-3000:]
        assert len(paused) == 2, "no two trials were seen paused at the rung:\n" + log_path.read_text()[-3000:]
    finally:
        sigkill(driver)
    first_log = log_path.read_text()
    assert all(f"[tune] {t} paused after epoch 1/3" in first_log for t in paused)
    before = trial_epochs(run)

    resume_to_the_end(args, ray_tmp, log_path)
    second_log = log_path.read_text()[len(first_log):]
    assert "[tune] resuming the search in" in second_log
    # Paused trials hold no slot, and never more than the planned two train at once.
    assert most_training_at_once(first_log) == 2 and most_training_at_once(second_log) <= 2

    after = trial_epochs(run)
    with (run / "tune" / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    lr_of = {r["trial_id"]: float(r["train.lr"]) for r in rows}
    # Each epoch once: the paused trials kept their epoch 1, the promoted one went on from its checkpoint.
    assert {lr_of[t]: e for t, e in after.items()} == {GOOD_LR: [1, 2, 3], WEAK_LR: [1], WEAK_LR / 10: [1]}
    assert all(after[t][: len(e)] == e for t, e in before.items())
    good = next(t for t, lr in lr_of.items() if lr == GOOD_LR)
    assert good in paused and f"[tune] {good} resumed after epoch 1/3" in second_log
    assert {lr_of[r["trial_id"]]: r["status"] for r in rows} == {
        GOOD_LR: "completed", WEAK_LR: "stopped", WEAK_LR / 10: "stopped"}
    summary = json.loads((run / "tune" / "summary.json").read_text())
    assert summary["resumed"] is True and summary["scheduler"] == "halving"
    assert summary["epochs_run"] == 5 and summary["epochs_full_budget"] == 9
    assert summary["best"]["overrides"]["train.lr"] == GOOD_LR
