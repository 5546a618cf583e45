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
TRIALS = 3  # two at a time: two wait at the rung for the third
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


def test_a_search_killed_then_interrupted_resumes_each_time_and_trains_every_epoch_once(tmp_path, ray_tmp):
    """One search stopped twice, the two ways a driver ends early, each time mid-way; every epoch
    trains once, as in a search that was never stopped.

    tune.scheduler=halving, 3 trials, two at a time: at the rung (epoch 1) the best 3 // 3 = 1 goes
    on to epoch 3. The good learning rate is drawn first, so it reaches the rung before the third
    trial starts and waits there, paused.
    1. While the search runs, a second `rayfine tune --resume` on its run directory is refused
       before its Ray starts (rayfine.rundir). Then the driver is SIGKILLed while the first two
       trials wait at the rung: Tune may not have saved their PAUSED status yet, and the resumed
       search must work it out from the trials' epoch logs.
    2. `--resume`: the third trial runs its epoch, the rung stops the two weak trials and resumes the
       good one from its checkpoint. Ctrl-C then: Tune stops its loop without raising; rayfine must
       not take the best trial so far for the search's result (no leaderboard, summary or winner).
    3. `--resume` again: the good trial continues from its checkpoint, the stopped ones stay stopped.
    """
    lrs = [GOOD_LR, WEAK_LR, WEAK_LR / 10]
    args = ["resnet18_digits_tiny", "--runs-dir", str(tmp_path), "--set", "name=stopped",
            "--set", "tune.scheduler=halving", "--set", "tune.reduction_factor=3", "--set", "tune.num_samples=1",
            "--set", f"tune.search_space.train.lr={{grid: [{', '.join(map(str, lrs))}]}}", *SMALL]
    run = tmp_path / "stopped"
    experiment = run / "ray" / "tune"
    log_path = tmp_path / "drivers.log"

    # 1. SIGKILL while two trials wait at the rung for the third.
    driver = start_driver(args, ray_tmp, log_path)
    paused: list[str] = []
    try:
        wait_for(lambda: trial_statuses(experiment) or driver.poll() is not None, 300, 0.5, "the search's first save")
        assert driver.poll() is None, log_path.read_text()[-3000:]
        early_log = tmp_path / "early_resume.log"
        expect_exit(start_driver([*args, "--resume"], ray_tmp, early_log), 1, 120, early_log)
        assert f"error: {run} is in use by another rayfine train, tune or run command" in early_log.read_text()
        assert "[ray]" not in early_log.read_text() and driver.poll() is None
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
    # Tune pauses a trial by stopping its actor, which takes a moment: a trial marked paused at the
    # rung may finish the epoch it had begun (epoch 2 here) before its processes end, as may the
    # killed driver's Ray in the seconds it lingers. That epoch is kept: a promoted trial goes on
    # after it, and a stopped one keeps it; the rung judges every trial by its epoch 1.
    killed = trial_epochs(run)
    assert sorted(killed) == paused and all(e in ([1], [1, 2]) for e in killed.values()), killed

    # 2. Resumed; Ctrl-C once the rung has decided and the good trial has started again.
    driver = start_driver([*args, "--resume"], ray_tmp, log_path)
    try:
        wait_for(lambda: re.search(r"\[tune\] \S+ resumed after epoch [12]/3", log_path.read_text()[len(first_log):])
                 or driver.poll() is not None, 600, 0.2, "the rung's winner resumed")
        assert driver.poll() is None, "the search ended before it could be interrupted:\n" + log_path.read_text()[-3000:]
    finally:
        ctrl_c(driver, log_path)
    second_log = log_path.read_text()[len(first_log):]
    assert "[tune] resuming the search in" in second_log
    assert re.search(r"\[tune\] interrupted; the search is saved in .*: continue it with --resume", second_log), second_log[-3000:]
    assert "[tune] leaderboard" not in second_log and "interrupted" in second_log.splitlines()  # the CLI's last word
    assert "Tuner.restore" not in second_log  # Tune's hint for its Python API, where the line above gives --resume
    assert not (run / "tune" / "summary.json").exists() and not (run / "tune" / "best").exists()
    interrupted = trial_epochs(run)
    assert len(interrupted) == TRIALS and any(len(e) < EPOCHS for e in interrupted.values())  # it really was mid-way
    tune_records = {t: (experiment / t / "result.json").read_bytes() for t in interrupted}

    # 3. Resumed to the end.
    resume_to_the_end(args, ray_tmp, log_path)
    third_log = log_path.read_text()[len(first_log) + len(second_log):]
    assert "[tune] resuming the search in" in third_log
    # Paused trials hold no slot, and never more than the planned two train at once.
    assert most_training_at_once(first_log) == 2
    assert most_training_at_once(second_log) <= 2 and most_training_at_once(third_log) <= 2

    after = trial_epochs(run)
    with (run / "tune" / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    lr_of = {r["trial_id"]: float(r["train.lr"]) for r in rows}
    # Each epoch once: the weak trials kept the epochs they had, the promoted one went on from its
    # checkpoint after each stop (a restart from scratch would report epoch 1 again).
    good = next(t for t, lr in lr_of.items() if lr == GOOD_LR)
    expected = {t: [1, 2, 3] if t == good else killed.get(t, [1]) for t in after}
    assert after == expected and sorted(lr_of[t] for t in after) == sorted(lrs)
    assert all(after[t][: len(e)] == e for t, e in (*killed.items(), *interrupted.items()))
    assert good in paused and f"[tune] {good} resumed after epoch {len(killed[good])}/3" in second_log
    assert re.search(rf"\[tune\] {good} resumed after epoch [12]/3", third_log), third_log[-3000:]
    # The trials the rung stopped before the Ctrl-C were not started again (Tune would give them a
    # fresh result.json), and the leaderboard still has them.
    for trial_id in after:
        if trial_id != good:
            assert (experiment / trial_id / "result.json").read_bytes() == tune_records[trial_id]
    leaderboard = third_log.rsplit("[tune] leaderboard", 1)[1]
    assert all(trial_id in leaderboard for trial_id in after)
    assert sorted((r["trial_id"], int(r["epoch"])) for r in rows) == sorted((t, e) for t, es in after.items() for e in es)
    assert {lr_of[r["trial_id"]]: r["status"] for r in rows} == {
        GOOD_LR: "completed", WEAK_LR: "stopped", WEAK_LR / 10: "stopped"}
    summary = json.loads((run / "tune" / "summary.json").read_text())
    assert summary["resumed"] is True and summary["scheduler"] == "halving" and summary["num_trials"] == TRIALS
    assert summary["epochs_run"] == sum(map(len, expected.values())) and summary["epochs_full_budget"] == 9
    assert summary["best"]["overrides"]["train.lr"] == GOOD_LR
    assert (run / "tune" / "best" / "checkpoint" / "model.safetensors").is_file()
    assert json.loads((run / "tune" / "best" / "eval.json").read_text())["accuracy"] == summary["best"]["test_accuracy"]
