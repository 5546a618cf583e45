"""The search's config section and resource plan (unit tier: no Ray)."""

from __future__ import annotations

import builtins
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rayfine.cli import main
from rayfine.config import ConfigError, check_search, load_config
from rayfine.tune.plan import count_trials, plan_resources
from rayfine.tune.progress import Board, SearchProgress, trial_status
from rayfine.tune.search import trial_params
from rayfine.tune.trial import trial_config

TWO_CPUS = {"CPU": 2.0}


def _errors(*overrides, name="resnet18_digits_tiny"):
    """Problems found at load time, or else by check_search (which `rayfine tune` runs first)."""
    try:
        cfg = load_config(name, list(overrides))
    except ConfigError as e:
        return "\n".join(e.errors)
    problems = check_search(cfg)
    assert problems, "no error"
    return "\n".join(problems)


@pytest.mark.parametrize("preset", ["resnet18_digits", "resnet18_digits_tiny", "resnet18_mnist5k"])
def test_presets_carry_a_learning_rate_by_batch_size_search(preset):
    t = load_config(preset).tune
    assert set(t.search_space) == {"train.lr", "train.batch_size"}
    assert t.scheduler == "asha" and t.grace_period == 1 and t.reduction_factor == 2


def test_search_space_accepts_yaml_keys_and_dotted_overrides():
    cfg = load_config("resnet18_digits_tiny", [
        "tune.search_space.train.weight_decay={uniform: [0, 0.1]}",
        "tune.search_space.train.lr={loguniform: [1e-4, 1e-2]}",  # YAML 1.1 reads 1e-4 as text: still a number
        "tune.search_space.train.batch_size=null",  # null drops a preset's dimension
        "tune.search_space.seed={grid: [0, 1, 2]}",
    ])
    assert cfg.tune.search_space == {
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "train.weight_decay": {"uniform": [0, 0.1]},
        "seed": {"grid": [0, 1, 2]},
    }
    assert count_trials(cfg.tune) == 3 * cfg.tune.num_samples


@pytest.mark.parametrize("override, message", [
    ("tune.search_space.train.lrr={choice: [0.1]}", "tune.search_space.train.lrr: the value 0.1 makes an invalid trial config: "
                                                    "train.lrr: unknown field; allowed here: epochs, lr,"),
    ("tune.search_space.train.lr={loguniform: [0, 0.1]}", "tune.search_space.train.lr: loguniform needs 0 < low"),
    ("tune.search_space.train.lr={loguniform: [1e-3, 20]}", "the value 20 makes an invalid trial config: "
                                                           "train.lr: Input should be less than or equal to 10"),
    ("tune.search_space.train.lr={normal: [0, 1]}", "unknown distribution 'normal'; allowed: uniform, loguniform, randint, choice, grid"),
    ("tune.search_space.train.batch_size={uniform: [16, 64]}", "train.batch_size: Input should be a valid integer"),
    ("tune.search_space.train.batch_size={randint: [0, 64]}", "the value 0 makes an invalid trial config: train.batch_size"),
    ("tune.search_space.train.optimizer={choice: [adamw, adam]}", "the value 'adam' makes an invalid trial config"),
    ("tune.search_space.data.augment={choice: [true, false]}", "tune.search_space.data.augment: cannot vary between trials"),
    ("tune.search_space.train.epochs={choice: [2, 4]}", "tune.search_space.train.epochs: cannot vary between trials"),
    ("tune.search_space.train.metric={choice: [val_loss, val_accuracy]}",
     "tune.search_space.train.metric: cannot vary between trials"),
    ("tune.search_space.train.keep_checkpoints={choice: [1, 2]}",
     "tune.search_space.train.keep_checkpoints: cannot vary between trials"),
    ("tune.search_space.train.lr={choice: []}", "choice needs a non-empty list"),
    ("tune.search_space.train={lr: [0.1, 0.2]}", ("tune.search_space.train: {'lr': [0.1, 0.2]} is not a search spec; "
                                                  "give train.lr a distribution, e.g. train.lr: {choice: [0.1, 0.2]}")),
    ("tune.search_space.train.lr=0.1", "expected one {distribution: args} mapping"),
    ("tune.trial_overrides=[scaling.num_workers=0]", "tune.trial_overrides make an invalid trial config: scaling.num_workers"),
    ("tune.trial_overrides=[name=other]", "tune.trial_overrides: name is shared by the search and its trials"),
    # the search's TensorBoard and MLflow runs and its winner's deployment take these from the config
    ("tune.trial_overrides=[tracking.tensorboard=false]", ("tune.trial_overrides: tracking.tensorboard is shared by "
                                                           "the search and its trials; set it outside tune")),
    ("tune.trial_overrides=[serve.num_replicas=2]", "tune.trial_overrides: serve.num_replicas is shared by the search"),
    ("tune.grace_period=3", "tune.grace_period: 3 leaves asha nothing to stop: it must be below the trials' train.epochs (3)"),
    ("tune.mode=min", "tune.mode: min with tune.metric val_accuracy, which is best at its max"),
    ("tune.scheduler=hyperband", "tune.scheduler: Input should be 'asha', 'halving' or 'fifo'"),
])
def test_bad_search_settings_are_refused_naming_the_field(override, message):
    assert message in _errors(override)


def test_a_text_search_cannot_vary_the_model_whose_tokenizer_made_its_datasets():
    """The datasets are tokenized once for all trials, with model.name's tokenizer."""
    override = "tune.search_space.model.name={choice: [minilm, bert-base-uncased]}"
    assert "model.name: cannot vary for text data" in _errors(override, name="minilm_rotten_tomatoes")
    # Images are prepared the same for every model (each trial normalizes as its model learnt).
    assert check_search(load_config("resnet18_digits_tiny", ["tune.search_space.model.name={choice: [resnet18, resnet34]}"])) == []


def test_grid_needs_the_random_searcher():
    assert "grid needs tune.searcher=random" in _errors("tune.searcher=optuna", "tune.search_space.seed={grid: [0, 1]}")


def test_halving_needs_the_random_searcher_and_a_rung_below_max_t():
    assert "use tune.searcher=random with tune.scheduler=halving" in _errors("tune.scheduler=halving", "tune.searcher=optuna")
    assert ("tune.grace_period: 3 leaves halving nothing to stop: it must be below the trials' train.epochs (3)"
            in _errors("tune.scheduler=halving", "tune.grace_period=3"))
    assert check_search(load_config("resnet18_digits_tiny", ["tune.scheduler=halving"])) == []


def test_a_trial_is_the_base_config_plus_its_sampled_values():
    cfg = load_config("resnet18_digits_tiny")
    base = cfg.with_overrides(list(cfg.tune.trial_overrides))
    trial = trial_config(base, {"train.lr": 0.0123, "train.batch_size": 16})
    assert (trial.train.lr, trial.train.batch_size, trial.train.epochs) == (0.0123, 16, 3)
    assert trial.scaling.num_workers == 1 and trial.data == cfg.data
    with pytest.raises(ConfigError, match="train.batch_size"):
        trial_config(base, {"train.batch_size": 0})


def test_a_trial_reads_a_sampled_local_model_path_from_the_drivers_directory(tmp_path, monkeypatch):
    """The search's checks read a relative model.weights or model.name of tune.search_space from the
    directory rayfine runs in; Tune then runs each trial in a directory of its own, where the same
    path named nothing, and every worker of every trial failed."""
    import ray.tune
    import ray.tune.integration.ray_train

    import rayfine.train
    from rayfine.tune.trial import run_trial

    project, trial_dir = tmp_path / "project", tmp_path / "trial"
    (project / "models" / "my-vit").mkdir(parents=True)
    trial_dir.mkdir()
    cfg = load_config("resnet18_digits_tiny", ["tune.search_space.model.weights={choice: [w.safetensors]}"])
    built = []

    class Context:
        def get_trial_id(self):
            return "t0"

    def build_trainer(trial_cfg, *args, **kwargs):
        built.append(trial_cfg.model)
        raise StopIteration

    monkeypatch.setattr(ray.tune, "get_context", Context)
    monkeypatch.setattr(ray.tune.integration.ray_train, "TuneReportCallback", object)  # needs a Tune session
    monkeypatch.setattr(rayfine.train, "build_trainer", build_trainer)
    monkeypatch.chdir(trial_dir)
    trial = {"base_json": cfg.model_dump_json(), "datasets": {}, "info": None, "shards": {},
             "storage_path": str(tmp_path / "trials"), "driver_dir": str(project)}
    for sampled_value in ({"model.weights": "w.safetensors"}, {"model.weights": str(tmp_path / "abs.safetensors")}):
        with pytest.raises(StopIteration):
            run_trial(sampled_value, **trial)
    assert [m.weights for m in built] == [str(project / "w.safetensors"), str(tmp_path / "abs.safetensors")]
    hf = load_config("resnet18_digits_tiny", ["model.name=google/vit-base-patch16-224", "model.weights=null",
                                              "tune.search_space.model.name={choice: [models/my-vit]}"])
    for name in ("models/my-vit", "google/vit-base-patch16-224"):  # a folder of the driver's, a hub id
        with pytest.raises(StopIteration):
            run_trial({"model.name": name}, **{**trial, "base_json": hf.model_dump_json()})
    assert [m.name for m in built[2:]] == [str(project / "models" / "my-vit"), "google/vit-base-patch16-224"]


def test_plan_counts_trial_actor_workers_and_ray_data():
    cfg = load_config("resnet18_digits_tiny")
    base = cfg.with_overrides(list(cfg.tune.trial_overrides))  # 1 worker x 0.5 + 0.25 Ray Data
    plan = plan_resources(base, cfg.tune, num_trials=4, cluster=TWO_CPUS)
    assert plan.trial_cpus == pytest.approx(0.76)
    assert (plan.fits, plan.concurrent) == (2, 2)
    assert "0.76 CPUs (trial actor 0.01 + 1 worker(s) x 0.5 + Ray Data 0.25)" in plan.describe()
    # Asking for more at once than fits is capped, and said so.
    capped = plan_resources(base, cfg.tune.model_copy(update={"max_concurrent_trials": 4}), 4, TWO_CPUS)
    assert capped.concurrent == 2 and "max_concurrent_trials=4 lowered to 2: that many trials of 0.76 CPUs fit in 2" \
        in capped.notes[0]
    assert plan_resources(base, cfg.tune, num_trials=1, cluster=TWO_CPUS).concurrent == 1
    # On GPUs the note names the GPUs when they are what holds the trials back.
    gpu = base.with_overrides(["scaling.use_gpu=true"])
    by_gpus = plan_resources(gpu, cfg.tune.model_copy(update={"max_concurrent_trials": 4}), 4, {"CPU": 32, "GPU": 2})
    assert by_gpus.concurrent == 2 and "lowered to 2: that many trials of 1 GPU(s) fit in 2" in by_gpus.notes[0]


def test_a_plan_that_cannot_fit_is_refused_with_what_to_change(monkeypatch):
    # The preset's own 2 workers x 0.75 + 0.5 for Ray Data + the trial actor: 2.01 CPUs on 2.
    cfg = load_config("resnet18_digits_tiny", ["tune.trial_overrides=[]"])
    with pytest.raises(ConfigError) as info:
        plan_resources(cfg, cfg.tune, num_trials=4, cluster=TWO_CPUS)
    message = str(info.value)
    assert "a trial needs 2.01 CPUs (trial actor 0.01 + 2 worker(s) x 0.75 CPU + 0.5 for Ray Data) but the cluster has 2" in message
    assert "scaling.num_workers, scaling.cpus_per_worker or scaling.data_cpus" in message
    assert "tune.trial_overrides" in message
    gpu = cfg.with_overrides(["scaling.use_gpu=true", "scaling.num_workers=1"])
    with pytest.raises(ConfigError, match="needs 1 GPU"):
        plan_resources(gpu, gpu.tune, num_trials=1, cluster=TWO_CPUS)
    # `rayfine train`'s own check names the same fields: here only scaling.data_cpus can make it fit.
    from rayfine.train import driver

    monkeypatch.setattr(driver.ray, "cluster_resources", lambda: TWO_CPUS)
    one = cfg.with_overrides(["scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "scaling.data_cpus=2"])
    with pytest.raises(ConfigError, match=r"needs 2.5 CPUs \(1 workers x 0.5 \+ 2 for Ray Data\) but the cluster has 2; "
                                          r"lower scaling.num_workers, scaling.cpus_per_worker or scaling.data_cpus"):
        driver.check_resources(one)
    # A plan that fits the cluster but not what is free now (a Serve app deployed in the same session
    # holds a CPU) waits: it says so, where it waited with no word.
    monkeypatch.setattr(driver.ray, "available_resources", lambda: {"CPU": 1.0})
    lines = []
    driver.check_resources(cfg.with_overrides(["scaling.num_workers=1"]), log=lines.append)
    assert lines == [("[train] waiting for CPUs: the run needs 1.25, and 1 of the cluster's 2 are free (other work on "
                      "this Ray holds the rest: a Serve app, another run; `ray status` shows them)")]
    # A search's trial too (it waited with no word): a trial of the tiny preset needs 1.26 CPUs.
    trial = cfg.with_overrides(["scaling.num_workers=1"])
    plan = plan_resources(trial, trial.tune, num_trials=4, cluster=TWO_CPUS)
    assert driver.waiting_for_cpus("tune", "a trial", plan.trial_cpus, plan.cluster_cpus) == (
        "[tune] waiting for CPUs: a trial needs 1.26, and 1 of the cluster's 2 are free (other work on this Ray holds "
        "the rest: a Serve app, another run; `ray status` shows them)")
    monkeypatch.setattr(driver.ray, "available_resources", lambda: {"CPU": 1.26})
    assert driver.waiting_for_cpus("tune", "a trial", plan.trial_cpus, plan.cluster_cpus) is None
    assert driver.waiting_for_cpus("tune", "a trial", 3, 2) is None  # never fits: the plan's own refusal or warning
    # The search says so before it reads its data (stopped there: no data is read in this test).
    from rayfine.tune import search

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(search.ray, "cluster_resources", lambda: TWO_CPUS)
    monkeypatch.setattr(driver.ray, "available_resources", lambda: {"CPU": 0.5})
    monkeypatch.setattr(search, "build_datasets", stop)
    lines = []
    with pytest.raises(Stop):
        search._run_search(trial, trial, resume=False, strict_resources=True, log=lines.append)
    assert lines[-1].startswith("[tune] waiting for CPUs: a trial needs 1.26, and 0.5 of the cluster's 2 are free")
    # On a cluster that may autoscale it is a warning, and trials run one at a time.
    lenient = plan_resources(cfg, cfg.tune, num_trials=4, cluster=TWO_CPUS, strict=False)
    assert lenient.concurrent == 1 and lenient.notes[0].startswith("[warning] a trial needs 2.01 CPUs")


class _Trial:
    def __init__(self, trial_id, status, last_result, config):
        self.trial_id, self.status, self.last_result, self.config = trial_id, status, last_result, config


def test_board_ranks_trials_by_their_best_epoch():
    board = Board(["train.lr"], "val_accuracy", "max", epochs=3)
    board.update(_Trial("a", "RUNNING", {"epoch": 1, "val_accuracy": 0.9, "val_loss": 0.3}, {"train.lr": 0.01}))
    board.update(_Trial("a", "TERMINATED", {"epoch": 3, "val_accuracy": 0.8, "val_loss": 0.4}, {"train.lr": 0.01}))
    board.update(_Trial("b", "TERMINATED", {"epoch": 1, "val_accuracy": 0.5, "val_loss": 1.3}, {"train.lr": 0.3}))
    board.update(_Trial("c", "PENDING", {}, {"train.lr": 0.001}))
    lines = board.leaderboard().splitlines()
    assert lines[0].split() == ["#", "trial", "train.lr", "status", "epoch", "val_accuracy", "val_loss", "best", "val_accuracy"]
    assert [line.split()[1] for line in lines[1:]] == ["a", "b", "c"]
    assert lines[1].split()[3:5] == ["completed", "3/3"] and lines[1].split()[-1] == "0.9"
    assert lines[2].split()[3] == "stopped"
    assert trial_status("ERROR", 2, 3) == "error"


def test_cli_tune_help_lists_resume():
    out = subprocess.run([sys.executable, "-m", "rayfine.cli", "tune", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--resume" in out and "--set" in out and "--runs-dir" in out and "--address" in out


def test_cli_tune_refuses_a_bad_search_with_exit_code_2(capsys):
    assert main(["tune", "resnet18_digits_tiny", "--set", "tune.search_space.train.lr={loguniform: [0, 1]}"]) == 2
    assert "tune.search_space.train.lr: loguniform needs 0 < low" in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_table_redraws_in_place_unless_something_else_was_printed(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    progress = SearchProgress(["train.lr"], "val_accuracy", "max", epochs=3, refresh_s=0)
    trial = _Trial("a", "RUNNING", {"epoch": 1, "val_accuracy": 0.5, "val_loss": 1.0}, {"train.lr": 0.01})
    erase = "\x1b[2F\x1b[J"  # up over the 2 lines of the last table, clear below
    # Once Ray forwards a worker's tqdm bar, it swaps builtins.print in the driver for a bar-aware
    # one (ray.experimental.tqdm_ray.safe_print): that is still the console.
    real_print = builtins.print
    monkeypatch.setattr(builtins, "print", lambda *a, **kw: real_print(*a, **kw))
    with progress.active():
        progress.setup()  # Tune calls it when the experiment starts
        progress.on_step_end(0, [trial])
        trial.last_result = {"epoch": 2, "val_accuracy": 0.7, "val_loss": 0.8}
        progress.on_step_end(1, [trial])
        print("(RayTrainWorker pid=1) a line from a worker")
        trial.last_result = {"epoch": 3, "val_accuracy": 0.8, "val_loss": 0.6}
        progress.on_step_end(2, [trial])
    assert sys.stdout is terminal
    out = terminal.getvalue()
    first, rest = out.split(erase)
    assert "1/3" in first and "2/3" in rest and erase not in rest
    # The worker's line stays on screen; the next table is drawn below it.
    before, after = rest.split("a line from a worker")
    assert "3/3" in after and "0.8" in after and "3/3" not in before
    # Not a terminal (or a log function): plain lines, no control codes.
    lines: list[str] = []
    plain = SearchProgress(["train.lr"], "val_accuracy", "max", epochs=3, log=lines.append)
    plain.on_trial_result(0, [trial], trial, trial.last_result)
    assert lines == ["[tune] a epoch 3/3  val_accuracy 0.8000  val_loss 0.6000"]


def test_plain_lines_say_when_a_trial_pauses_and_resumes():
    lines: list[str] = []
    plain = SearchProgress(["train.lr"], "val_accuracy", "max", epochs=3, log=lines.append)
    trial = _Trial("a", "RUNNING", {"epoch": 1, "val_accuracy": 0.5, "val_loss": 1.0}, {"train.lr": 0.01})
    plain.on_step_end(0, [trial])
    trial.status = "PAUSED"
    plain.on_step_end(1, [trial])
    plain.on_step_end(2, [trial])  # said once
    trial.status = "RUNNING"
    plain.on_trial_start(3, [trial], trial)
    # A resumed search may bring a trial back before Tune recorded any result of it.
    restored = _Trial("b", "PAUSED", {}, {"train.lr": 0.02})
    plain.on_step_end(4, [restored])
    assert lines == ["[tune] a paused after epoch 1/3; waits for the other trials to reach it",
                     "[tune] a resumed after epoch 1/3 (train.lr=0.01)",
                     "[tune] b paused; waits for the other trials to reach it"]


def test_a_resumed_search_shows_what_its_trials_trained_before():
    # The driver was killed before Tune saved these trials' results: Tune restores them without
    # any, and the progress reads the epochs each trial's epoch log holds.
    logs = {"a": [{"epoch": 1, "val_accuracy": 0.9, "val_loss": 0.3}, {"epoch": 2, "val_accuracy": 0.8, "val_loss": 0.4}],
            "b": [{"epoch": 1, "val_accuracy": 0.1, "val_loss": 2.3}]}
    lines: list[str] = []
    plain = SearchProgress(["train.lr"], "val_accuracy", "max", epochs=3, log=lines.append,
                           history=lambda trial_id: logs.get(trial_id, []))
    plain.setup()
    a = _Trial("a", "PAUSED", {"epoch": 1, "val_accuracy": 0.9, "val_loss": 0.3}, {"train.lr": 0.01})  # saved at epoch 1
    b = _Trial("b", "PAUSED", {}, {"train.lr": 1e-6})
    fresh = _Trial("c", "PENDING", {}, {"train.lr": 0.1})
    plain.on_step_end(0, [a, b, fresh])
    a.status = "RUNNING"
    plain.on_trial_start(1, [a, b, fresh], a)
    plain.on_trial_start(1, [a, b, fresh], fresh)
    plain.on_trial_complete(2, [a, b, fresh], b)
    a.last_result = {"epoch": 3, "val_accuracy": 0.85, "val_loss": 0.35}
    plain.on_trial_complete(3, [a, b, fresh], a)
    assert lines == ["[tune] a paused after epoch 2/3; waits for the other trials to reach it",
                     "[tune] b paused after epoch 1/3; waits for the other trials to reach it",
                     "[tune] a resumed after epoch 2/3 (train.lr=0.01)",
                     "[tune] c started (train.lr=0.1)",
                     "[tune] b stopped early after epoch 1/3; best val_accuracy 0.1",
                     "[tune] a completed; best val_accuracy 0.9"]
    assert [row.split()[1] for row in plain.board.leaderboard().splitlines()[1:]] == ["a", "b", "c"]


def test_a_training_config_loads_whatever_its_search_says():
    """`rayfine train --set train.epochs=1` (and the checkpoint it writes) must load, although a
    search of 1-epoch trials leaves ASHA nothing to stop; only `rayfine tune` refuses that."""
    cfg = load_config("resnet18_digits_tiny", ["train.epochs=1", "tune.trial_overrides=[]"])
    assert cfg.train.epochs == 1
    assert any("tune.grace_period" in p for p in check_search(cfg))
    assert main(["validate", "resnet18_digits_tiny", "--set", "train.epochs=1", "--set", "tune.trial_overrides=[]"]) == 0


class _Result:
    """What trial_params and trial_rows read of a Tune Result."""

    def __init__(self, config, path, metrics=None):
        import pyarrow.fs

        self.config, self.path, self.filesystem = config, str(path), pyarrow.fs.LocalFileSystem()
        self.metrics, self.error = metrics or {}, None


def test_a_trial_restored_without_results_still_has_its_config(tmp_path):
    # Tune's Result.config is the "config" of the trial's last result: None for a trial a resumed
    # search restored without results and stopped before it reported again.
    (tmp_path / "params.json").write_text(json.dumps({"train.lr": 1e-6, "train.batch_size": 32}))
    assert trial_params(_Result(None, tmp_path)) == {"train.lr": 1e-6, "train.batch_size": 32}
    assert trial_params(_Result({"train.lr": 0.1}, tmp_path)) == {"train.lr": 0.1}
    assert trial_params(_Result(None, tmp_path / "missing")) == {}


def test_resume_refuses_a_changed_config_but_not_where_it_runs(tmp_path):
    """A resumed search's trials continue from their checkpoints: changing what they train (data,
    model, train.*) or the search (tune.*) is refused; where and how it runs (scaling, storage,
    tracking, serve, train.max_failures) may change."""
    from rayfine.tune.search import _check_previous_search, experiment_path

    def cfg(*extra):
        return load_config("resnet18_digits_tiny", ["name=s", f"storage.runs_dir={tmp_path}", *extra])

    first = cfg()
    first.run_dir().mkdir(parents=True)
    (first.run_dir() / "config.yaml").write_text(first.to_yaml())
    Path(experiment_path(first)).mkdir(parents=True)
    (Path(experiment_path(first)) / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for

    _check_previous_search(cfg("scaling.num_workers=1", "train.max_failures=3", "tracking.tensorboard=false"),
                           experiment_path(first), resume=True)
    for change in ("train.lr=0.5", "data.source=builtin:mnist5k", "model.name=resnet34", "tune.num_samples=99"):
        with pytest.raises(ConfigError, match=rf"--resume: .* ran with another config \(changed: {change.split('=')[0]}\)"):
            _check_previous_search(cfg(change), experiment_path(first), resume=True)


def test_trials_keep_their_checkpoints_by_the_metric_that_ranks_the_search():
    from rayfine.tune.search import trial_base

    assert trial_base(load_config("resnet18_digits_tiny", ["tune.metric=val_loss"])).train.metric == "val_loss"
    assert trial_base(load_config("resnet18_digits_tiny", ["tune.metric=val_macro_f1", "train.metric=val_loss"])).train.metric == "val_macro_f1"
    assert trial_base(load_config("resnet18_digits_tiny", ["tune.metric=train_loss"])).train.metric == "val_accuracy"
    assert trial_base(load_config("resnet18_digits_tiny", ["tune.trial_overrides=[train.lr=0.5]"])).train.lr == 0.5


def test_an_epoch_a_resumed_run_replays_is_logged_and_sent_on_only_if_its_log_lacks_it(tmp_path):
    """Ray Train registers an epoch's checkpoint before the report callbacks run; a trial whose node
    died in between resumes after an epoch its log never saw, and its workers report that epoch
    again (REPLAYED_FROM). The trials' EpochLog and `rayfine train`'s MetricsLog add it only then,
    and EpochLog hands Tune only what it added, with the checkpoint's path."""
    from ray.train import Checkpoint, UserCallback

    from rayfine.train import MetricsLog
    from rayfine.train.worker import REPLAYED_FROM
    from rayfine.tune.trial import EpochLog, read_epoch_log

    class ToTune(UserCallback):
        def __init__(self):
            self.sent = []

        def after_report(self, run_context, metrics, checkpoint):
            assert checkpoint is None  # the path travels in the metrics, as TuneReportCallback sends it
            self.sent.append(metrics[0])

    (tmp_path / "c1").mkdir()
    first = Checkpoint.from_directory(str(tmp_path / "c1"))
    epoch = {1: {"epoch": 1, "val_accuracy": 0.5}, 2: {"epoch": 2, "val_accuracy": 0.75}}
    to_tune = ToTune()
    trial_log, train_log = EpochLog(str(tmp_path / "trial" / "epochs.jsonl"), then=to_tune), MetricsLog(str(tmp_path / "metrics.jsonl"))
    reports = [
        ([epoch[1]], first),  # as trained
        ([{**epoch[1], REPLAYED_FROM: first.path}], None),  # a resumed run replays an epoch it logged
        ([{**epoch[2], REPLAYED_FROM: "/storage/c2"}], None),  # ... and one whose callbacks never ran
    ]
    for metrics, checkpoint in reports:
        trial_log.after_report(None, metrics, checkpoint)
        train_log.after_report(None, metrics, checkpoint)
    expected = [{**epoch[1], "checkpoint_path": first.path}, {**epoch[2], "checkpoint_path": "/storage/c2"}]
    assert list(read_epoch_log(trial_log.path)) == expected
    assert to_tune.sent == expected
    assert [json.loads(x) for x in Path(train_log.path).read_text().splitlines()] == [epoch[1], epoch[2]]


def test_ties_go_to_the_earlier_epoch_then_the_lower_trial_id_in_any_order(tmp_path):
    """A resumed search gets its results back from Tune in another order: the winner, the
    leaderboard and trials.csv's rows must not depend on it."""
    import itertools

    from rayfine.tune.search import pick_best

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    rows = [{"trial_id": t, "epoch": e, "val_accuracy": v, "checkpoint_path": str(ckpt)}
            for t, e, v in (("00002", 3, 0.98), ("00001", 3, 0.98), ("00003", 2, 0.98), ("00000", 3, 0.97))]
    for order in itertools.permutations(rows):
        assert pick_best(list(order), "val_accuracy", "max")["trial_id"] == "00003"  # the earlier epoch
        same_epoch = [r for r in order if r["epoch"] == 3]
        assert pick_best(same_epoch, "val_accuracy", "max")["trial_id"] == "00001"  # then the lower id
    for order in itertools.permutations(["b", "a", "c"]):
        board = Board(["train.lr"], "val_accuracy", "max", epochs=3)
        for trial in order:
            board.update(_Trial(trial, "TERMINATED", {"epoch": 3, "val_accuracy": 0.9 if trial != "c" else 0.95,
                                                      "val_loss": 0.3}, {"train.lr": 0.01}))
        assert [line.split()[1] for line in board.leaderboard().splitlines()[1:]] == ["c", "a", "b"]


def test_trials_csv_rows_are_in_trial_and_epoch_order_whatever_order_tune_returns(tmp_path):
    from rayfine.tune.search import trial_rows
    from rayfine.tune.trial import epoch_log_path

    results = []
    for trial_id in ("00002", "00000", "00001"):
        log = Path(epoch_log_path(str(tmp_path), trial_id))
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(json.dumps({"epoch": e, "val_accuracy": 0.5}) + "\n" for e in (2, 1)))
        results.append(_Result({"train.lr": 0.1}, tmp_path / trial_id, metrics={"trial_id": trial_id}))
    rows = trial_rows(results, ["train.lr"], 2, str(tmp_path))
    assert [(r["trial_id"], r["epoch"]) for r in rows] == [(t, e) for t in ("00000", "00001", "00002") for e in (1, 2)]


def test_a_training_run_and_a_search_under_one_name_each_keep_the_config_they_are_checked_against(tmp_path):
    """`rayfine train` and `rayfine tune` share a run directory: each keeps its config in its own
    folder (config.yaml at the top is the last one's), so a training run that changed tune.* does not
    make the search's --resume refuse, nor a changed search section the report's config."""
    from rayfine.report import _config_section
    from rayfine.rundir import save_config, saved_config
    from rayfine.train.driver import _check_continuation
    from rayfine.tune.search import _check_previous_search, experiment_path

    def cfg(*extra):
        return load_config("resnet18_digits_tiny", ["name=s", f"storage.runs_dir={tmp_path}", *extra])

    search, run_dir = cfg("tune.num_samples=4"), cfg().run_dir()
    save_config(run_dir, "tune", search.to_yaml())
    Path(experiment_path(search)).mkdir(parents=True)
    (Path(experiment_path(search)) / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    training = cfg("tune.num_samples=8")  # tune.* may change for a training run
    assert not _check_continuation(run_dir, training)
    # One name, one experiment: a training run that changes what is trained is refused beside a search too.
    with pytest.raises(ConfigError, match=r"holds a search of a different config \(changed: train.lr\)"):
        _check_continuation(run_dir, cfg("train.lr=0.5", "tune.num_samples=8"))
    save_config(run_dir, "train", training.to_yaml())
    (run_dir / "train" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert (run_dir / "config.yaml").read_text() == training.to_yaml()
    _check_previous_search(search, experiment_path(search), resume=True)  # against the search's own config
    with pytest.raises(ConfigError, match=r"ran with another config \(changed: tune.num_samples\)"):
        _check_previous_search(training, experiment_path(search), resume=True)
    assert "num_samples: 4" in _config_section(saved_config(run_dir, "tune"))


def test_the_winner_is_an_epoch_whose_checkpoint_remote_storage_still_has(tmp_path):
    """Ray Train keeps the later of equal scores and deletes the other checkpoints; pick_best ties to
    the earlier epoch, so it must see, in the storage's own filesystem (s3://...: paths relative
    to it), which checkpoints are left."""
    import pyarrow.fs

    from rayfine.tune.search import pick_best

    remote = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())
    remote.create_dir("bucket/trials/t0/checkpoint_000001")  # epoch 2's; epoch 1's (the same score) was deleted
    rows = [{"trial_id": "t0", "epoch": e, "val_accuracy": 0.9, "checkpoint_path": f"bucket/trials/t0/checkpoint_00000{e - 1}"}
            for e in (1, 2)]
    assert pick_best(rows, "val_accuracy", "max", remote)["epoch"] == 2
    remote.delete_dir("bucket/trials/t0/checkpoint_000001")
    assert pick_best(rows, "val_accuracy", "max", remote) is None


def test_the_leaderboard_ranks_as_the_winner_is_picked_and_a_nan_epoch_is_no_best(tmp_path):
    """The leaderboard's #1 is the trial `[tune] best:` names: equal best values go to the earlier
    epoch before the lower trial id; a diverged (NaN) epoch is never a trial's best, on the board
    or in report.html's leaderboard."""
    from rayfine.tune.search import pick_best

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    curves = {"t0": [0.5, 0.9], "t1": [0.9, 0.7], "t2": [float("nan"), 0.6]}
    board = Board([], "val_accuracy", "max", epochs=2)
    rows = []
    for trial_id, values in curves.items():
        for epoch, value in enumerate(values, 1):
            board.update(_Trial(trial_id, "RUNNING", {"epoch": epoch, "val_accuracy": value}, {}))
            rows.append({"trial_id": trial_id, "epoch": epoch, "val_accuracy": value, "checkpoint_path": str(ckpt)})
    ranked = [line.split()[1] for line in board.leaderboard().splitlines()[1:]]
    assert ranked[0] == pick_best(rows, "val_accuracy", "max")["trial_id"] == "t1"  # 0.9 at epoch 1
    assert ranked == ["t1", "t0", "t2"] and board.rows["t2"]["best"] == 0.6


def test_the_report_takes_no_nan_epoch_for_a_trials_best():
    from rayfine.report import _best_value

    assert _best_value([float("nan"), 0.6, None], 1) == 0.6 and _best_value([float("nan"), 0.2], -1) == 0.2
    assert math.isnan(_best_value([float("nan")], 1))


def _noop_trial(config):
    pass


@pytest.mark.parametrize("scheduler,searcher", [("fifo", "random"), ("asha", "random"), ("halving", "random"),
                                                ("asha", "optuna")])
def test_a_resumed_search_runs_as_many_trials_at_once_as_its_new_plan_says(tmp_path, scheduler, searcher):
    """Tuner.restore gives back the searcher and scheduler pickled when the search was created (and
    sets the searcher's saved state over it): with bigger trials or a smaller cluster the first
    driver's plan would start more trials than fit. They take the resuming driver's plan, and its
    train.max_failures (Tune's retries of a failed trial)."""
    from ray import tune

    from rayfine.tune.limits import RunLimits, resuming
    from rayfine.tune.search import _scheduler, _searcher

    cfg = load_config("resnet18_digits_tiny", [f"tune.scheduler={scheduler}", f"tune.searcher={searcher}"])
    first = _scheduler(cfg, 4, 4, 2, history=lambda trial_id: [], max_failures=0)
    trainable = tune.with_resources(_noop_trial, {"cpu": 0.01})
    tune.Tuner(trainable, param_space={"x": tune.uniform(0, 1)},
               tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", scheduler=first,
                                           search_alg=_searcher(cfg, 2, first), num_samples=4),
               run_config=tune.RunConfig(name="tune", storage_path=str(tmp_path)))
    with resuming(RunLimits(concurrent=1, max_failures=3)):
        restored = tune.Tuner.restore(str(tmp_path / "tune"), trainable=trainable)
    tune_config = restored._local_tuner._tune_config
    search_alg, limits = tune_config.search_alg, tune_config.scheduler
    assert limits.slots == 1 and limits.max_failures == 3
    if scheduler != "halving":  # halving's searcher asks the scheduler (slots) for each trial
        saved = search_alg.get_state()  # Tune sets the searcher's saved state when the search starts
        saved["max_concurrent"] = 2
        search_alg.set_state(saved)
        assert search_alg.max_concurrent == 1
    trial = type("T", (), {"trial_id": "t_0", "status": "PENDING", "max_failures": 0})()
    limits.set_search_properties("val_accuracy", "max")  # as tune.run does
    limits.on_trial_add(None, trial)
    assert trial.max_failures == 3  # what Tune's Trial.should_recover reads


def test_a_search_left_in_a_storage_path_is_named_where_it_is(tmp_path):
    """With storage.storage_path, a search's Tune state is outside the run directory: the refusal
    says where, since removing the run directory alone would not remove it."""
    from rayfine.tune.search import _check_previous_search, experiment_path

    cfg = load_config("resnet18_digits_tiny", [f"storage.runs_dir={tmp_path / 'runs'}", "name=run",
                                               f"storage.storage_path={tmp_path / 'shared'}"])
    state = Path(experiment_path(cfg))
    state.mkdir(parents=True)
    (state / "tuner.pkl").write_bytes(b"")
    with pytest.raises(ConfigError) as refused:
        _check_previous_search(cfg, experiment_path(cfg), resume=False)
    assert f"or remove {cfg.run_dir()} and {state}" in str(refused.value)
    # Its run directory gone (or looked for in another runs_dir): nothing to check a --resume's config
    # against, so it is refused rather than continued under whatever config is given.
    assert not cfg.run_dir().exists()
    with pytest.raises(ConfigError, match=rf"--resume: the search in {state} has no saved config in {cfg.run_dir()}"):
        _check_previous_search(cfg.with_overrides(["train.lr=0.5"]), experiment_path(cfg), resume=True)
    cfg.run_dir().mkdir(parents=True)
    (cfg.run_dir() / "config.yaml").write_text(cfg.to_yaml())
    _check_previous_search(cfg, experiment_path(cfg), resume=True)


def test_a_search_whose_tune_state_is_elsewhere_or_gone_is_not_replaced_by_a_new_one(tmp_path):
    """A finished search's run directory after its ray/ was removed (the README says it may be), or
    under another storage.storage_path: a new search there replaced its winner, trials.csv and
    report, and --resume advised exactly that. A training run's directory takes a first search, and
    so does one whose search was killed before Tune saved anything (it left only its config)."""
    from rayfine.rundir import save_config
    from rayfine.tune.search import _check_previous_search, experiment_path

    def cfg(*extra):
        return load_config("resnet18_digits_tiny", ["name=s", f"storage.runs_dir={tmp_path / 'runs'}", *extra])

    trained = cfg()
    save_config(trained.run_dir(), "train", trained.to_yaml())
    _check_previous_search(trained, experiment_path(trained), resume=False)  # no search there yet

    shared_path = tmp_path / "shared"
    shared = cfg(f"storage.storage_path={shared_path}")
    save_config(shared.run_dir(), "tune", shared.to_yaml())
    tune_dir = shared.run_dir() / "tune"
    # Killed before Tune saved anything: only the marker, so a new search may start (the same command
    # again), and there is nothing for --resume.
    _check_previous_search(shared, experiment_path(shared), resume=False)
    with pytest.raises(ConfigError, match="--resume: no search to resume in"):
        _check_previous_search(shared, experiment_path(shared), resume=True)

    state = Path(experiment_path(shared))
    state.mkdir(parents=True)
    (state / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    (tune_dir / "summary.json").write_text("{}")
    (tune_dir / "best").mkdir()
    _check_previous_search(shared, experiment_path(shared), resume=True)
    for local in (cfg(), cfg(f"storage.storage_path={tmp_path / 'other'}")):
        with pytest.raises(ConfigError) as refused:
            _check_previous_search(local, experiment_path(local), resume=False)
        assert (f"{shared.run_dir()} already holds a search, which keeps its Ray Tune state in {state} "
                f"(storage.storage_path {shared_path}), not in {experiment_path(local)}: to continue it, "
                f"set storage.storage_path back to {shared_path} and add --resume; to start a new search, "
                f"choose another `name` (--set name=...) or remove {tune_dir}") in str(refused.value)
        with pytest.raises(ConfigError, match=rf"--resume: storage.storage_path changed from {shared_path} to "
                                              rf"{local.storage.storage_path or 'null'}:"):
            _check_previous_search(local, experiment_path(local), resume=True)

    shutil.rmtree(shared_path)  # the state removed; the search's summary.json and best/ stay
    for search in (shared, cfg()):  # looked for where it was, or under another storage
        with pytest.raises(ConfigError) as refused:
            _check_previous_search(search, experiment_path(search), resume=False)
        assert (f"already holds a search, whose Ray Tune state is gone from {state} (removed?): its summary.json, "
                f"best stay in {tune_dir}; to start a new search, choose another `name` (--set name=...) or remove "
                f"{tune_dir}") in str(refused.value)
        with pytest.raises(ConfigError, match=rf"--resume: the search in .* has no Ray Tune state left in {state}"):
            _check_previous_search(search, experiment_path(search), resume=True)


def test_ranking_by_train_loss_while_searching_how_it_is_weighed_is_refused():
    """train_loss includes label smoothing and class weights: a search over them ranked by it would
    favour the trial with the least smoothing, not the best model."""
    smoothing = "tune.search_space.train.label_smoothing={uniform: [0.0, 0.2]}"
    (problem,) = check_search(load_config("resnet18_digits_tiny", ["tune.metric=train_loss", smoothing]))
    assert problem.startswith("tune.metric: train_loss includes train.label_smoothing, which the search varies")
    assert check_search(load_config("resnet18_digits_tiny", ["tune.metric=val_loss", smoothing])) == []
    assert check_search(load_config("resnet18_digits_tiny", ["tune.metric=train_loss"])) == []


def test_a_search_puts_back_the_signal_handlers_and_environment_tune_changes(monkeypatch):
    """Tune installs its stop handler for SIGUSR1 as for SIGINT and leaves it installed: after a
    search, a SIGUSR1 to the caller's process logged "Stop signal received" and put the SIGINT
    handler of before the search back. RAY_AIR_NEW_OUTPUT=0 (Tune's console output off) stayed set."""
    import os
    import signal

    from rayfine.tune.search import _fit

    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    monkeypatch.delenv("TUNE_DISABLE_SIGINT_HANDLER", raising=False)
    seen = []

    def mine(signum, frame):
        pass

    def tunes(signum, frame):
        pass

    class Tuner:  # what ray.tune.tune._setup_signal_catching does in fit()
        def fit(self):
            seen.append(os.environ.get("RAY_AIR_NEW_OUTPUT"))
            signal.signal(signal.SIGINT, tunes)
            signal.signal(signal.SIGUSR1, tunes)
            return "results"

    previous = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGUSR1)}
    try:
        assert _fit(Tuner()) == ("results", False)
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGUSR1) is mine
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert seen == ["0"] and "RAY_AIR_NEW_OUTPUT" not in os.environ


def test_the_live_table_counts_the_rows_a_narrow_or_short_terminal_shows_it_on():
    """The shipped presets' tables are 91-98 columns wide: on an 80-column terminal each line wraps
    onto two rows, the redraw moved up over half of them and left stale copies of the table; a
    table taller than the screen cannot be moved over either."""
    import os

    from rayfine.tune.progress import fit_screen

    table = "\n".join(["h" * 91, "r" * 98, "s" * 40])
    assert fit_screen(table, os.terminal_size((160, 24))) == (table, 3)
    assert fit_screen(table, os.terminal_size((80, 24))) == (table, 5)  # 2 + 2 + 1 rows
    tall = "\n".join(f"row {i}" for i in range(30))
    shown, rows = fit_screen(tall, os.terminal_size((80, 24)))
    assert rows == 23 and shown.splitlines()[:22] == tall.splitlines()[:22]
    assert shown.splitlines()[-1] == "... 8 more line(s) (a larger terminal shows them)"


def test_a_terminal_without_cursor_movement_gets_plain_lines(monkeypatch):
    """TERM=dumb (Emacs' shell, some CI ptys) cannot move the cursor: the live table's escapes
    showed there as ^[[3F^[[J."""
    from rayfine.progress import interactive

    monkeypatch.setattr(sys, "stdout", _Terminal())
    monkeypatch.setenv("TERM", "xterm-256color")
    assert interactive(print)
    monkeypatch.setenv("TERM", "dumb")
    assert not interactive(print)
    assert not SearchProgress(["train.lr"], "val_accuracy", "max", epochs=3).live


def test_the_final_table_holds_the_epochs_of_trials_tune_stopped_before_it_heard_of_them():
    """tune.time_budget_s can stop a trial after it logged an epoch but before its result reached
    Tune: the leaderboard showed "-" for every trial, while the winner line and trials.csv (both
    read from the epoch logs) had the epoch."""
    logs: dict[str, list[dict]] = {}
    lines: list[str] = []
    progress = SearchProgress(["train.lr"], "val_accuracy", "max", epochs=3, log=lines.append,
                              history=lambda trial_id: logs.get(trial_id, []))
    progress.setup()
    a, b = _Trial("a", "RUNNING", {}, {"train.lr": 0.01}), _Trial("b", "RUNNING", {}, {"train.lr": 0.02})
    progress.on_trial_start(0, [a, b], a)
    progress.on_trial_start(0, [a, b], b)
    logs.update({"a": [{"epoch": 1, "val_accuracy": 0.357, "val_loss": 1.0}],
                 "b": [{"epoch": 1, "val_accuracy": 0.5, "val_loss": 0.9}]})
    a.status = b.status = "TERMINATED"  # stopped by the time budget, no result heard
    progress.on_experiment_end([a, b])
    rows = [row.split() for row in progress.board.leaderboard().splitlines()[1:]]
    assert [(r[1], r[3], r[4], r[-1]) for r in rows] == [("b", "stopped", "1/3", "0.5"), ("a", "stopped", "1/3", "0.357")]


def test_tunes_resume_hint_is_left_out_where_the_command_gives_its_own():
    """After a Ctrl-C Tune logged "Resume experiment with: Tuner.restore(path=..., trainable=...)",
    the Python API's way, just before rayfine's line giving the command's (--resume)."""
    import inspect
    import logging

    import ray.tune.tune as tune_module

    from rayfine.tune.search import TUNE_INTERRUPTED_NOTICE, TUNE_LOGGER, _fit

    assert tune_module.logger.name == TUNE_LOGGER and TUNE_INTERRUPTED_NOTICE in inspect.getsource(tune_module)
    hint = f"{TUNE_INTERRUPTED_NOTICE} saved.\nResume experiment with: Tuner.restore(path='x', trainable=...)"
    seen = []

    class Seen(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    class Tuner:  # logs as ray.tune.tune.run does when a Ctrl-C stopped its loop
        def fit(self):
            tune_module.logger.warning(hint)
            tune_module.logger.warning("Trials did not complete: [t1]")
            return "results"

    handler = Seen()
    tune_module.logger.addHandler(handler)
    try:
        assert _fit(Tuner())[0] == "results"
        tune_module.logger.warning(hint)  # outside rayfine's search, as Ray has it
    finally:
        tune_module.logger.removeHandler(handler)
    assert seen == ["Trials did not complete: [t1]", hint]
