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
