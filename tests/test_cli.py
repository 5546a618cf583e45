"""The CLI's own decisions, with the stages it drives replaced (unit tier)."""

from __future__ import annotations

import contextlib
import signal
import time
import types

import pytest
import ray
from ray import serve

from rayfine import cli


@pytest.mark.parametrize("action, stops_the_app", [
    ("deployed", True), ("swapped", False), ("kept", False), ("unchanged", False)])
def test_run_on_a_cluster_stops_at_ctrl_c_only_the_app_it_deployed(tmp_path, monkeypatch, capsys, action,
                                                                    stops_the_app):
    """`rayfine run --address ...` serves until Ctrl-C and then deletes its app, in the cluster's
    deploy turn (as a deploy applies the apps); when an app of that
    name was already serving (the new winner was swapped into it, or it was kept), the app is not
    the command's: it returns at once and leaves it serving, as `rayfine serve` does. Replicas it
    deployed or swapped into that serve beyond loopback without an API key are warned of."""
    import rayfine.pipeline
    import rayfine.runtime
    import rayfine.serve.deploy
    import rayfine.tune.search

    deleted, turn = [], []  # turn: whether this command holds the cluster's deploy turn

    @contextlib.contextmanager
    def deploy_turn(log=print):
        turn.append(True)
        try:
            yield
        finally:
            turn.pop()

    monkeypatch.setattr(rayfine.serve.deploy, "_deploy_lock", deploy_turn)
    monkeypatch.setattr(rayfine.tune.search, "preflight", lambda cfg, resume=False: cfg)
    monkeypatch.setattr(rayfine.runtime, "ray_session", lambda address=None: contextlib.nullcontext(False))
    live = action in ("deployed", "swapped")  # deploy() reports the replicas' key only then
    monkeypatch.setattr(rayfine.pipeline, "run_pipeline", lambda cfg, **_: {
        "serve": {"action": action, "name": "digits", "version": "v2", "url": "http://0.0.0.0:8000",
                  "reason": "validation accuracy 0.99 > 0.98", **({"api_key": False} if live else {})},
        "eval": {"accuracy": 0.99}, "timings_s": {"search": 1.0}})
    # Deleted in the deploy turn: a deploy that read the apps before and applied them after would bring it back.
    monkeypatch.setattr(serve, "delete", lambda name: deleted.append((name, turn == [True])))
    monkeypatch.setattr(serve, "shutdown", lambda: pytest.fail("an app on a cluster is deleted, not all of Serve"))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(gcs_address="10.0.0.1:6379"))
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # pytest's own SIGINT handler stays

    def ctrl_c(_seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", ctrl_c)
    assert cli.main(["run", "resnet18_digits_tiny", "--runs-dir", str(tmp_path), "--address", "10.0.0.1:6379"]) == 0
    assert deleted == ([("digits", True)] if stops_the_app else [])
    warning = "[warning] the API has no key and listens on 0.0.0.0: anyone who reaches port 8000 can use it"
    assert (warning in capsys.readouterr().out) == live


def test_the_api_key_is_reported_and_an_api_open_beyond_loopback_is_warned_of():
    """Replicas report whether they hold a key (never the key); `serve` and `run` say the API asks
    for it, or warn when an API without one listens on an address other machines can reach."""
    from rayfine.config import ServeConfig

    settings = ServeConfig(api_key_env="MY_KEY")
    for url in ("http://127.0.0.1:8000", "http://0.0.0.0:8000/digits"):
        assert cli.key_notice(url, True, settings).startswith("[serve] the API asks for its key")
    for url in ("http://127.0.0.1:8000", "http://localhost:8000/digits", "http://[::1]:8000", "http://127.0.0.2:9"):
        assert cli.key_notice(url, False, settings) is None  # loopback: this machine's users only
    assert cli.key_notice("http://0.0.0.0:8000", None, settings) is None  # replicas that do not say
    assert cli.key_notice("http://0.0.0.0:8000", False, settings) == (
        "[warning] the API has no key and listens on 0.0.0.0: anyone who reaches port 8000 can use it; set the "
        "variable MY_KEY (or serve.api_key_file) where the replicas run, and serve again")
    for url, host in (("http://[::]:80", "::"), ("http://10.1.2.3:80/x", "10.1.2.3"), ("http://gpu-box:80", "gpu-box")):
        assert f"listens on {host}: " in cli.key_notice(url, False, settings)


@pytest.mark.parametrize("argv", [["--debug", "predict", "http://h", "a"], ["predict", "http://h", "a", "--debug"],
                                  ["--debug", "train", "x"], ["train", "x", "--debug"],
                                  ["--debug", "jobs", "list"], ["jobs", "list", "--debug"]])
def test_debug_is_taken_before_and_after_the_command(argv):
    """The error hint says "rerun with --debug": it may go anywhere on the command line."""
    assert cli.build_parser().parse_args(argv).debug is True
    assert cli.build_parser().parse_args([a for a in argv if a != "--debug"]).debug is False


def test_debug_after_the_command_shows_the_traceback(monkeypatch):
    def fail(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_report", fail)
    assert cli.main(["report", "runs/x"]) == cli.EXIT_FAILED
    for argv in (["report", "runs/x", "--debug"], ["--debug", "report", "runs/x"]):
        with pytest.raises(RuntimeError, match="boom"):
            cli.main(argv)


def test_version(capsys):
    from rayfine import __version__

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"rayfine {__version__}\n"


def test_a_reader_that_went_away_ends_the_command_quietly_with_141():
    """`rayfine ... | head -1`: the reader closes the pipe; no error line, exit 128 + SIGPIPE."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "rayfine.cli", "validate", "--list"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, check=False)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, "")


READER_GONE_MID_SEARCH = """
import sys
from ray.tune.error import TuneError
from rayfine import cli

def search(args):  # Tune's loop calls rayfine's progress callback, and wraps what it raised
    try:
        for epoch in range(100000):
            print(f"[tune] t1 epoch {epoch}")
    except BrokenPipeError as e:
        raise TuneError("Traceback ... BrokenPipeError: [Errno 32] Broken pipe") from e

cli.cmd_report = search
sys.exit(cli.main(["report", "runs/x"]))
"""

EPOCH_LINES_GONE = """
import signal, sys, threading, time
from pathlib import Path
from rayfine.train import driver

# fit() waits under a SIGINT handler of its own (InterruptibleTrainer): this stands in for it, also
# where the process began with SIGINT ignored (a command started in the background, as CI runs it).
signal.signal(signal.SIGINT, signal.default_int_handler)

path = Path(sys.argv[1])
path.write_text('{"epoch": 1}\\n')
def shown(record):
    raise BrokenPipeError(32, "Broken pipe")  # print() into a pipe whose reader went away

try:  # from the follower's start: its interrupt can come at once
    threading.Thread(target=driver._follow, args=(path, threading.Event(), shown, 0, driver._ctrl_c_to_main),
                     daemon=True).start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # fit() training on, unseen
        time.sleep(0.1)
except KeyboardInterrupt:
    print("stopped as by Ctrl-C", file=sys.stderr)
"""


# The script's stdout: a pipe whose reader has gone. Made in the script itself, so that no other
# process can hold the reading end open (a process forked by another thread of this one, between
# os.pipe() here and closing that end, keeps a copy until it execs).
BROKEN_STDOUT = """
import os
_read, _write = os.pipe()
os.dup2(_write, 1)
os.close(_read)
os.close(_write)
"""


def _closed_pipe_run(script: str, *args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", BROKEN_STDOUT + script, *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=60, check=False)


def test_a_reader_that_went_away_mid_run_ends_it_quietly_with_141(tmp_path):
    """`rayfine tune ... | head -7`: Tune wrapped the BrokenPipeError of rayfine's progress line in
    a TuneError, which exited 1 with a traceback; `rayfine train ... | head -5`: the thread printing
    the epoch lines died with a traceback while training went on unseen."""
    result = _closed_pipe_run(READER_GONE_MID_SEARCH)
    assert (result.returncode, result.stderr) == (141, "")
    result = _closed_pipe_run(EPOCH_LINES_GONE, str(tmp_path / "metrics.jsonl"))
    assert (result.returncode, result.stderr) == (0, "stopped as by Ctrl-C\n")


PRINTS_THEN_WORKS = """
import sys, time
from rayfine import cli

def work(args):
    print("[train] epoch 1/8 ...")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # training on, until the test has read the line and ends it
        time.sleep(0.1)
    return 0

cli.cmd_report = work
sys.exit(cli.main(["report", "runs/x"]))
"""


def test_each_line_reaches_a_pipe_as_it_is_printed():
    """Into a pipe, a file or a CI log Python buffers stdout in blocks: nothing showed until the
    command ended (`tail -f` of a search's log stayed empty for minutes), and a killed one lost it."""
    import os
    import select
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-c", PRINTS_THEN_WORKS], stdout=subprocess.PIPE, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready and proc.stdout.readline() == b"[train] epoch 1/8 ...\n"
        assert proc.poll() is None  # still at work
    finally:
        proc.kill()
        proc.wait()


def test_a_broken_pipe_that_is_not_standard_output_is_a_failure(monkeypatch, capsys):
    """Only a reader of stdout that went away ends quietly; another pipe or socket breaking is an error."""
    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_validate", broken)
    assert cli.main(["validate", "resnet18_digits_tiny"]) == cli.EXIT_FAILED
    assert "error: BrokenPipeError" in capsys.readouterr().err


def test_submit_refuses_a_config_from_standard_input(capsys):
    assert cli.main(["submit", "-"]) == cli.EXIT_USAGE
    assert "not from standard input or a pipe" in capsys.readouterr().err
    for command, offered in (("submit", False), ("train", True)):  # and its --help does not offer it
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert ("- for standard input" in " ".join(capsys.readouterr().out.split())) is offered, command


def test_predictions_show_control_characters_escaped():
    """One line of tab-separated fields per input, whatever the text holds."""
    from rayfine.serve.client import format_predictions

    top = [{"label": "pos", "score": 0.9}, {"label": "n\teg", "score": 0.1}]
    result = {"model_name": "m", "model_version": "1", "predictions": [{"label": "pos", "score": 0.9, "top_k": top}] * 2}
    lines = format_predictions(["line one\nline\ttwo \x1b[31m", "café 日本\r"], result).splitlines()
    assert lines[1:] == ["line one\\nline\\ttwo \\x1b[31m\tpos\t0.9000\t(n\\teg 0.100)",
                         "café 日本\\r\tpos\t0.9000\t(n\\teg 0.100)"]


@pytest.fixture
def no_ray(monkeypatch):
    """A command that must refuse before Ray starts: starting it fails the test."""
    import rayfine.runtime

    def refused(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(rayfine.runtime, "ray_session", refused)


def test_serve_refuses_a_path_without_a_checkpoint_before_ray_starts(no_ray, tmp_path, capsys):
    assert cli.main(["serve", str(tmp_path / "nothing")]) == cli.EXIT_FAILED
    assert "nothing" in capsys.readouterr().err


def test_serve_refuses_a_wrong_serve_setting_or_port_before_ray_starts(no_ray, tmp_path, capsys):
    """`rayfine serve RUN --set serve.max_batch_size=0` (or --port 99999) started Ray, and was
    refused ~10 s later; it is a config error like any other, told at once."""
    from rayfine import checkpoints
    from rayfine.config import load_config
    from rayfine.models import build_model

    cfg = load_config("resnet18_digits_tiny")
    directory = checkpoints.save_checkpoint(tmp_path / "ckpt", build_model(cfg, ["0", "1"]), cfg, ["0", "1"],
                                            {"epoch": 1, "val_accuracy": 0.5})
    assert cli.main(["serve", str(directory), "--set", "serve.max_batch_size=0"]) == cli.EXIT_USAGE
    assert "serve.max_batch_size: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert cli.main(["serve", str(directory), "--port", "99999"]) == cli.EXIT_USAGE
    assert "serve.port: Input should be less than or equal to 65535" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["argument", "environment"])
def test_a_dashboard_address_is_refused_in_one_line_before_ray_starts(where, monkeypatch):
    """`rayfine submit`/`jobs` take an http:// RAY_ADDRESS (the Jobs API), as Ray's job CLI does;
    `train`/`tune`/`run`/`serve` connect to the GCS or Ray Client and say so, instead of ray.init's
    4-line ValueError."""
    import ray

    from rayfine.config import ConfigError
    from rayfine.runtime import ray_session

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if where == "environment":
        monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ConfigError, match=r"Ray address http://127.0.0.1:8265 is a dashboard \(Jobs API\) address"):
        with ray_session("http://127.0.0.1:8265" if where == "argument" else None, log=lambda *_: None):
            pass
    assert not ray.is_initialized()


def test_a_refused_connection_says_how_ray_sends_a_clusters_token(monkeypatch):
    """A driver connecting to a cluster with token authentication without RAY_AUTH_MODE=token (a
    new-user trial against cluster/local/up.sh): Ray printed ~20 s of InvalidAuthToken lines, then
    "Failed to connect to Ray cluster at <resolved address>", naming neither the token nor the
    variable. The error now says it; with RAY_AUTH_MODE=token set it is Ray's alone."""
    import ray

    from rayfine.runtime import ray_session

    def refused(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.2:6379")

    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    hinted = (r"^Failed to connect to Ray cluster at 192.0.2.2:6379; if the cluster uses token authentication .* "
              r"set RAY_AUTH_MODE=token in this shell")
    with pytest.raises(ConnectionError, match=hinted), ray_session("127.0.0.1:6379", log=lambda *_: None):
        pass
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ConnectionError, match=r"^Failed to connect to Ray cluster at 192.0.2.2:6379$"), \
            ray_session("127.0.0.1:6379", log=lambda *_: None):
        pass


def test_serve_refuses_a_name_no_url_can_carry_before_ray_starts(no_ray, tmp_path, capsys):
    """--name is the model's name in every /v2/models/<name> route: "team/digits" matched none of
    them, "stats" was shadowed by /v2/models/stats; both deployed and printed a URL."""

    for name, rule in (("team/digits", "1-100 characters of letters"), ("stats", "/v2/models/stats is every")):
        assert cli.main(["serve", str(tmp_path), "--name", name]) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert "--name: " in err and rule in err and repr(name) in err, err


@pytest.mark.parametrize("command", ["tune", "run"])
def test_a_set_that_every_trial_overrides_again_is_refused_before_ray_starts(command, no_ray, tmp_path, capsys):
    """`rayfine tune resnet18_digits --set train.epochs=3`: the preset's tune.trial_overrides sets
    train.epochs=8 for every trial after the --set, so the search trained 8 epochs a trial and
    said nothing. The refusal gives the --set that does it."""

    base = [command, "resnet18_digits_tiny", "--runs-dir", str(tmp_path)]
    assert cli.main([*base, "--set", "train.epochs=2", "--set", "train.lr=0.01"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert ("train.epochs: tune.trial_overrides sets train.epochs for every trial, after --set; give it there: "
            "--set 'tune.trial_overrides=[scaling.num_workers=1, scaling.cpus_per_worker=0.5, scaling.data_cpus=0.25, "
            "train.epochs=2]'") in err, err
    assert "train.lr: tune.search_space draws train.lr for every trial; to fix it, drop that dimension too: " \
           "--set tune.search_space.train.lr=null" in err, err
    assert not any(tmp_path.iterdir())  # nothing written
    # The value a trial gets anyway, and what the refusal suggests, are taken.
    from rayfine.config import load_config, shadowed_overrides

    cfg = load_config("resnet18_digits_tiny")
    assert shadowed_overrides(cfg, ["train.epochs=3", "tune.num_samples=4", "seed=1"]) == []
    fixed = cfg.with_overrides(["tune.trial_overrides=[scaling.num_workers=1, train.epochs=2]",
                                "tune.search_space.train.lr=null"])
    assert shadowed_overrides(fixed, ["train.epochs=2", "train.lr=0.01"]) == []
    assert shadowed_overrides(cfg, ["scaling={num_workers: 2}"])[0].startswith(
        "scaling: tune.trial_overrides sets scaling.num_workers, scaling.cpus_per_worker, scaling.data_cpus")
