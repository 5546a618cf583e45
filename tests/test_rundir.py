"""rayfine.rundir: one rayfine train, tune or run at a time per run directory (unit tier: no Ray).

Two commands on one run directory would resume from the same checkpoints and delete each
other's (seen: Ray Train's checkpoint manager failing on a checkpoint the other run removed).
The second one must stop before Ray starts and touch nothing; the lock must go with its holder,
however the holder ends. tests/test_tune_resume.py checks the same refusal against a running search.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from rayfine.cli import main
from rayfine.rundir import RunDirBusy, RunDirLock

HOLDER = """
import sys
from rayfine.rundir import RunDirLock
lock = RunDirLock(sys.argv[1], "train").acquire()
print("held", flush=True)
sys.stdin.read()  # until the test kills it
"""


def test_a_second_holder_is_refused_until_the_first_lets_go(tmp_path):
    run = tmp_path / "runs" / "digits"
    with RunDirLock(run, "train"):
        assert run.is_dir() and list(run.iterdir()) == []  # created, and no lock file added to it
        with pytest.raises(RunDirBusy, match=r"digits is in use by another rayfine train, tune or run command.*`rayfine tune`"):
            RunDirLock(run, "tune").acquire()
    with RunDirLock(run, "tune") as lock:  # let go at the end of the block
        lock.release()
        lock.release()  # twice is harmless
        RunDirLock(run, "run").acquire().release()  # and release() lets go before it


def test_a_run_directory_the_lock_made_goes_again_if_nothing_was_written_to_it(tmp_path):
    # As when a command is refused after taking it (a search plan the cluster cannot run).
    made, written, there = tmp_path / "made", tmp_path / "written", tmp_path / "there"
    there.mkdir()
    for run in (made, written, there):
        with RunDirLock(run, "tune"):
            assert run.is_dir()
            if run is written:
                (run / "config.yaml").write_text("name: written\n")
    assert not made.exists()
    assert [p.name for p in written.iterdir()] == ["config.yaml"]
    assert there.is_dir()  # not made by the lock: kept, empty or not
    # A runs_dir made for it goes too (a refused first command left an empty ./runs behind) ...
    with RunDirLock(tmp_path / "new_runs" / "deeper" / "made", "tune"):
        pass
    assert not (tmp_path / "new_runs").exists()
    # ... unless something else was written there meanwhile.
    with RunDirLock(tmp_path / "shared" / "made", "tune"):
        (tmp_path / "shared" / "other").mkdir()
    assert [p.name for p in (tmp_path / "shared").iterdir()] == ["other"]


def test_a_killed_holder_leaves_the_run_directory_free(tmp_path):
    run = tmp_path / "digits"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy):
            RunDirLock(run, "train").acquire()
        os.kill(holder.pid, signal.SIGKILL)  # as a driver killed mid-run: no cleanup runs
        holder.wait(timeout=30)
        RunDirLock(run, "train").acquire().release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdin.close()
        holder.stdout.close()


@pytest.mark.parametrize("command", [["train"], ["tune"], ["run", "--detach"]])
def test_cli_commands_stop_before_ray_starts_when_the_run_directory_is_held(command, tmp_path, capsys):
    run = tmp_path / "busy"
    run.mkdir()
    (run / "config.yaml").write_text("kept: as it was\n")
    args = [command[0], "resnet18_digits_tiny", *command[1:], "--runs-dir", str(tmp_path), "--set", "name=busy"]
    with RunDirLock(run, "train"), mock.patch("rayfine.runtime.ray_session", side_effect=AssertionError("Ray started")):
        assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run} is in use by another rayfine train, tune or run command"), err
    assert f"`rayfine {command[0]}` continues this run" in err
    assert [p.name for p in run.iterdir()] == ["config.yaml"] and (run / "config.yaml").read_text() == "kept: as it was\n"


@pytest.mark.parametrize("api", ["rayfine.train.driver.fit", "rayfine.tune.search.run_search"])
def test_fit_and_run_search_from_python_hold_the_run_directory_as_the_commands_do(api, tmp_path):
    import importlib
    import threading

    from rayfine.config import load_config

    module_name, name = api.rsplit(".", 1)
    module = importlib.import_module(module_name)
    call = getattr(module, name)
    cfg = load_config("resnet18_digits_tiny", [f"storage.runs_dir={tmp_path}", "name=busy"])
    run = cfg.run_dir()
    # Another process holds it: refused at once, before Ray is needed, and nothing is written.
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match="is in use by another rayfine train, tune or run command"):
            call(cfg)
        assert list(run.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()
        holder.stdout.close()
    # The body (which needs Ray) stubbed: what is checked is who may run it.
    with mock.patch.object(module, f"_{name}", return_value="ran"):
        assert call(cfg) == "ran"  # takes the directory and lets it go
        with RunDirLock(run, "train"):  # as the `rayfine` command around it holds it
            assert call(cfg) == "ran"
            refused = []
            other = threading.Thread(target=lambda: refused.append(pytest.raises(RunDirBusy, call, cfg)))
            other.start()
            other.join()
            assert len(refused) == 1  # another thread of this process is refused
        RunDirLock(run, "train").acquire().release()  # free again


# --- files a kill or a full disk cut short ----------------------------------------------------------


def test_a_metrics_line_cut_short_is_not_an_epoch_and_the_next_one_starts_on_its_own_line(tmp_path):
    """A disk that filled mid-append (or a kill) left a partial last line in metrics.jsonl; every
    continuation then failed on it ("training failed: Expecting ',' delimiter", no file named), and
    the next epoch appended to it made a line `rayfine report` could not read either."""
    import json

    from rayfine.errors import RayfineError
    from rayfine.report import train_report
    from rayfine.train.driver import MetricsLog
    from rayfine.train.worker import REPLAYED_FROM
    from rayfine.tune.trial import EpochLog, read_epoch_log

    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    (run / "train" / "config.yaml").write_text("train: {metric: val_accuracy}\n")
    path = run / "train" / "metrics.jsonl"
    epoch = {"epoch": 1, "train_loss": 0.9, "val_loss": 0.8, "val_accuracy": 0.5, "val_macro_f1": 0.4,
             "samples_per_s": 10.0, "epoch_s": 1.0}
    path.write_text(json.dumps(epoch) + "\n" + '{"epoch": 2, "train_loss": 0.5, "val_los')
    log = MetricsLog(str(path))
    assert log._logged_epochs() == {1}
    log.after_report(None, [{**epoch, "epoch": 2, REPLAYED_FROM: "ckpt"}], None)  # a continuation replays epoch 2
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2]
    assert train_report(run).is_file()

    trial = tmp_path / "trial" / "epochs.jsonl"
    trial.parent.mkdir()
    trial.write_text(json.dumps({**epoch, "checkpoint_path": "a"}) + "\n" + '{"epoch": 2, "tra')
    assert [r["epoch"] for r in read_epoch_log(str(trial))] == [1]
    EpochLog(str(trial)).after_report(None, [{**epoch, "epoch": 2}], None)
    assert [r["epoch"] for r in read_epoch_log(str(trial))] == [1, 2]

    from rayfine.rundir import jsonl_records

    path.write_text(path.read_text().replace('{"epoch": 2', '{"epoch": 2,,', 1))  # damaged inside: named
    with pytest.raises(RayfineError, match=r"metrics.jsonl: line 2 is not JSON \(.*\); it was edited or damaged"):
        jsonl_records(path.read_text(), path)


def test_a_file_written_again_keeps_its_mode(tmp_path):
    """config.yaml keeps a tracking password: a user who made it private (chmod 600) kept it so
    only until the next command wrote it again (0644 under the usual umask)."""
    import stat

    from rayfine.rundir import write_atomic

    path = tmp_path / "config.yaml"
    write_atomic(path, "a: 1\n")
    path.chmod(0o600)
    write_atomic(path, "a: 2\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "a: 2\n"


def test_a_folder_of_the_run_this_account_cannot_write_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """check_storage looked at the run directory alone: a train/ left read-only (another account's
    run, a restore from a backup) failed once Ray had started, naming a hidden temporary file."""
    from rayfine.config import ConfigError, load_config
    from rayfine.train import driver

    cfg = load_config("resnet18_digits_tiny", ["name=x", f"storage.runs_dir={tmp_path}"])
    locked = cfg.run_dir() / "train"
    locked.mkdir(parents=True)
    driver.check_storage(cfg)
    real_access = os.access  # the tests may run as root, whom os.access lets write anywhere
    monkeypatch.setattr(driver.os, "access", lambda path, mode: real_access(path, mode) and Path(path) != locked)
    with pytest.raises(ConfigError, match=rf"storage.runs_dir: this account may not write to {locked}, which this run "
                                          r"writes to; give it write permission"):
        driver.check_storage(cfg)
