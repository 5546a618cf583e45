"""The search driver: plan, run (or resume) the Tune experiment, write tune/ in the run directory.

    with ray_session():
        summary = run_search(load_config("resnet18_digits_tiny"))

Storage: the Tune experiment lives in <storage>/tune (its state, one folder per trial), and each
trial's Ray Train run in <storage>/trials/trial_<id> (per-epoch checkpoints). <storage> is
``Config.resolved_storage_path()``: <runs>/<name>/ray, or <storage.storage_path>/<name>/ray.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import signal
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import ray
from ray import tune

from rayfine.config import Config, ConfigError, check_search, yaml_value
from rayfine.config.sections import storage_location
from rayfine.data import build_datasets
from rayfine.data.sources import check_source
from rayfine.errors import TrainingError
from rayfine.metrics import json_text, nan_for_null
from rayfine.models import absolute_model_paths, check_model
from rayfine.rundir import command_config, holding, save_config, saved_config, write_atomic
from rayfine.runtime import NoticeFilter, Terminated, restored_environ
from rayfine.tracking import SearchTracking, check_mlflow_store
from rayfine.train import METRIC_KEYS
from rayfine.train.driver import (
    RESUMABLE_CHANGES,
    _check_continuation,
    changes_since,
    check_storage,
    export_best,
    saved_storage_path,
    split_for_workers,
    waiting_for_cpus,
)
from rayfine.tune.asha import ResumableASHA
from rayfine.tune.halving import SlotGatedVariants, SuccessiveHalving
from rayfine.tune.limits import LimitedConcurrency, LimitedFIFO, LimitedVariants, RunLimits, resuming
from rayfine.tune.plan import TRIAL_ACTOR_CPUS, count_trials, plan_resources
from rayfine.tune.progress import SearchProgress, rank_key, trial_status
from rayfine.tune.trial import (
    StopMarks,
    epoch_log_path,
    epoch_rows,
    read_epoch_log,
    run_trial,
    trial_config,
    trial_dirname,
    tune_space,
)

BEST_SUFFIX = "-best"


EXPERIMENT_NAME = "tune"


def trial_base(cfg: Config) -> Config:
    """The config every trial starts from: tune.trial_overrides applied, and train.metric set to
    tune.metric (a trial keeps its train.keep_checkpoints best epochs by train.metric, and the
    winning epoch's checkpoint must be one of them; train_loss is no train.metric)."""
    base = cfg.with_overrides(list(cfg.tune.trial_overrides))
    if cfg.tune.metric != "train_loss" and base.train.metric != cfg.tune.metric:
        base = base.with_overrides([f"train.metric={cfg.tune.metric}"])
    return base


def experiment_path(cfg: Config) -> str:
    return f"{cfg.resolved_storage_path()}/{EXPERIMENT_NAME}"


def trials_root(cfg: Config) -> str:
    """Where the trials' Ray Train runs (checkpoints, epoch logs) are stored."""
    return f"{cfg.resolved_storage_path()}/trials"


def preflight(cfg: Config, resume: bool = False) -> Config:
    """What `rayfine tune` and `rayfine run` refuse before Ray starts and before the run directory
    is touched: a search that cannot run, a search already there (or none to resume), a changed
    config under this run's name, a data.source that does not exist, a model the trials' workers
    could not build, an MLflow store that cannot open. Returns the trials' base config (``trial_base``)."""
    if not cfg.tune.search_space:
        raise ConfigError(["tune.search_space is empty: give at least one dimension, e.g. "
                           "--set 'tune.search_space.train.lr={loguniform: [1.0e-4, 1.0e-2]}'"])
    problems = check_search(cfg)
    if problems:
        raise ConfigError(problems)
    _check_previous_search(cfg, experiment_path(cfg), resume)
    base = trial_base(cfg)
    check_source(base.data)
    check_model(base)
    _check_searched_models(cfg, base)
    check_mlflow_store(cfg)
    check_storage(cfg)
    return base


def _check_searched_models(cfg: Config, base: Config) -> None:
    """``check_model`` for every value the search space gives a model.* field (each choice or grid
    value, a range's ends and an inner point): a model.name or model.weights that cannot be built
    failed every worker of its trials, train.max_failures times over, after Ray started."""
    from rayfine.config.search import parse_search_spec, search_points

    for key, spec in cfg.tune.search_space.items():
        if not key.startswith("model."):
            continue
        for value in search_points(*parse_search_spec(spec)):  # check_search has checked the spec
            try:
                check_model(trial_config(base, {key: value}))
            except ConfigError as e:
                raise ConfigError([f"tune.search_space.{key}: the value {value!r}: {x}" for x in e.errors]) from None


def run_search(cfg: Config, *, resume: bool = False, strict_resources: bool = True, log=print) -> dict[str, Any]:
    """Run the search of ``cfg.tune`` (or continue it: ``resume``); returns summary.json's content.

    Needs a connected Ray (``rayfine.runtime.ray_session``). It holds the run directory while it
    runs (``rayfine.rundir``): another search, ``fit``, `rayfine train`, `tune` or `run` on it
    raises RunDirBusy.
    """
    base = preflight(cfg, resume)
    with holding(cfg.run_dir(), "tune"):
        marker = command_config(cfg.run_dir(), "tune")
        # Without --resume, preflight let no earlier search through but one that left only this marker
        # (killed before Tune saved anything).
        new_search = not resume
        try:
            return _run_search(cfg, base, resume=resume, strict_resources=strict_resources, log=log)
        except BaseException:
            # tune/config.yaml marks a search (``_check_continuation``), written once the data is
            # read; a search that failed before Tune saved its experiment (Ctrl-C, its tracking, the
            # Tuner) would refuse the corrected command ("holds a search of a different config") and
            # leave --resume nothing to resume.
            if new_search and marker.is_file() and not _search_saved(experiment_path(cfg)):
                marker.unlink()
            raise


def _search_saved(path: str) -> bool:
    """Whether Tune saved a search's experiment at ``path``; True when that cannot be told (storage
    that does not answer): a marker then stays, and a search's own error is the one raised."""
    try:
        return tune.Tuner.can_restore(path)
    except Exception:  # noqa: BLE001
        return True


def _run_search(cfg: Config, base: Config, *, resume: bool, strict_resources: bool, log) -> dict[str, Any]:
    started = time.time()
    t = cfg.tune
    run_dir, path = cfg.run_dir(), experiment_path(cfg)
    epochs = base.train.epochs
    keys = list(t.search_space)
    num_trials = count_trials(t)
    plan = plan_resources(base, t, num_trials, ray.cluster_resources(), strict=strict_resources)
    for note in plan.notes:
        log(note)
    log(plan.describe())
    if notice := waiting_for_cpus("tune", "a trial", plan.trial_cpus, plan.cluster_cpus):
        log(notice)
    datasets, info = build_datasets(base, log=log)
    save_config(run_dir, "tune", cfg.to_yaml())  # after the data: a run killed while reading it marks no search

    trainable = tune.with_resources(
        # Trials and their workers run in directories of their own: local model paths made absolute.
        tune.with_parameters(run_trial, base_json=absolute_model_paths(base).model_dump_json(), datasets=datasets,
                             info=info, shards=split_for_workers(base, datasets), storage_path=trials_root(cfg),
                             driver_dir=os.getcwd()),
        {"cpu": TRIAL_ACTOR_CPUS},
    )
    # Each trial's epoch log: what it trained before a resume (Tune restores its scheduler empty,
    # and trials without the results it had not saved yet).
    history = partial(_trial_history, trials_root(cfg))
    progress = SearchProgress(keys, t.metric, t.metric_mode, epochs, log=log, history=history)
    tracking = SearchTracking(cfg, keys, resume=resume)
    try:
        with progress.active(), tracking.active():
            if resume:
                log(f"[tune] resuming the search in {path}")
                # Tune restores the searcher and scheduler the search was created with: they take
                # this plan (trials at a time) and train.max_failures instead (rayfine.tune.limits).
                with resuming(RunLimits(concurrent=plan.concurrent, max_failures=base.train.max_failures)):
                    tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
            else:
                log(f"[tune] {num_trials} trial(s) of {epochs} epoch(s), scheduler {t.scheduler}, "
                    f"searcher {t.searcher} -> {run_dir}")
                scheduler = _scheduler(cfg, epochs, num_trials, plan.concurrent, history, base.train.max_failures)
                tuner = tune.Tuner(
                    trainable,
                    param_space=tune_space(t.search_space),
                    tune_config=tune.TuneConfig(
                        metric=t.metric,
                        mode=t.metric_mode,
                        scheduler=scheduler,
                        # The searcher holds the concurrency limit (Tune ignores max_concurrent_trials
                        # for a BasicVariantGenerator instance).
                        search_alg=_searcher(cfg, plan.concurrent, scheduler),
                        num_samples=t.num_samples,
                        time_budget_s=t.time_budget_s,
                        trial_dirname_creator=trial_dirname,
                    ),
                    run_config=tune.RunConfig(
                        name=EXPERIMENT_NAME,
                        storage_path=cfg.resolved_storage_path(),
                        callbacks=[progress, tracking],
                        # A trial that fails as a whole (its Train controller lost with a node, say)
                        # runs again; its Train run, named after the trial, continues from its last
                        # checkpoint. Worker failures inside a trial are train.max_failures' business.
                        failure_config=tune.FailureConfig(max_failures=base.train.max_failures),
                        verbose=0,
                    ),
                )
            results, interrupted = _fit(tuner)
        if interrupted:
            log(f"[tune] interrupted; the search is saved in {path}: continue it with --resume")
            raise KeyboardInterrupt
    except BaseException as e:  # the search's MLflow runs and TensorBoard writers end too
        if isinstance(e, Terminated):  # as the Ctrl-C path above says
            log(f"[tune] terminated; continue the search in {path} with --resume")
        tracking.finish(None, None, None, status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    log("[tune] leaderboard\n" + progress.board.leaderboard())
    summary = None
    try:
        summary = write_outputs(cfg, base, results, datasets, plan.concurrent, started, resume, log=log)
    finally:
        best_dir = run_dir / "tune" / "best"
        evaluation = (nan_for_null(json.loads((best_dir / "eval.json").read_text()), ("accuracy", "macro_f1", "loss"))
                      if summary and summary.get("best") else None)  # a non-finite test loss is logged, as NaN
        tracking.finish(summary, evaluation, best_dir / "checkpoint" if evaluation else None)
    return summary


# After a Ctrl-C Tune logs "...Resume experiment with: Tuner.restore(path=..., trainable=...)", the
# Python API's way to continue; rayfine's next line gives the command's (--resume).
TUNE_LOGGER = "ray.tune.tune"
TUNE_INTERRUPTED_NOTICE = "Experiment has been interrupted, but the most recent state was"


def _fit(tuner: tune.Tuner) -> tuple[Any, bool]:
    """``tuner.fit()``, and whether a SIGINT (Ctrl-C) or SIGUSR1 stopped it part-way.

    Tune stops its loop on those signals without raising: it saves the experiment and stops the
    trials as if they had finished, so the results alone cannot tell. For the loop it installs its
    own SIGINT handler, which it replaces with the previous one when such a signal arrives and
    otherwise leaves installed (it would swallow the next Ctrl-C). So: the previous handler back
    means the search was interrupted; either way the previous handler is put back, and SIGUSR1's
    (Tune's stays installed otherwise). Tune's own resume hint is left out meanwhile
    (TUNE_INTERRUPTED_NOTICE)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT)
    previous_usr1 = signal.getsignal(signal.SIGUSR1)  # Tune's handler too, left installed
    tune_handles = main and not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0"))
    tune_hint = NoticeFilter(TUNE_INTERRUPTED_NOTICE)
    logging.getLogger(TUNE_LOGGER).addFilter(tune_hint)
    try:
        # Tune's own console output (a header, its periodic tables) would interleave with the live
        # table; the legacy reporter at verbose=0 prints nothing.
        with restored_environ("RAY_AIR_NEW_OUTPUT"):
            os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
            results = tuner.fit()
    finally:
        logging.getLogger(TUNE_LOGGER).removeFilter(tune_hint)
        interrupted = tune_handles and signal.getsignal(signal.SIGINT) is previous
        if tune_handles:
            signal.signal(signal.SIGINT, previous)
        if main and previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, previous_usr1)
    return results, interrupted


def _check_previous_search(cfg: Config, path: str, resume: bool) -> None:
    exists = tune.Tuner.can_restore(path)
    if not exists and command_config(cfg.run_dir(), "tune").is_file():
        _check_search_state_kept(cfg, path, resume)
    if resume and not exists:
        raise ConfigError([f"--resume: no search to resume in {path}; run `rayfine tune` without --resume to start one"])
    if not resume and exists:
        where = cfg.run_dir() if path.startswith(str(cfg.run_dir()) + "/") else f"{cfg.run_dir()} and {path}"
        raise ConfigError([f"{cfg.run_dir()} already holds a search ({path}): add --resume to continue it, or choose "
                           f"another `name` (--set name=...) or remove {where}"])
    _check_continuation(cfg.run_dir(), cfg)  # refuses a different experiment under this name
    previous = saved_config(cfg.run_dir(), "tune")
    if resume and not previous.is_file():
        # A search saves its config there before Tune saves anything: its run directory was removed,
        # or is another one (storage.runs_dir, the working directory), and with a storage.storage_path
        # the search outlives it. Its trials would continue under a config nothing was checked against.
        raise ConfigError([(f"--resume: the search in {path} has no saved config in {cfg.run_dir()} to check this "
                            "config against (its run directory was removed, or is in another storage.runs_dir); "
                            "resume it from its own run directory, or start a new search under another `name` "
                            f"(--set name=...) or after removing {path}")])
    if resume:
        # Its trials continue from their checkpoints: what they train, and the search itself, must
        # not change (tune.* included, unlike a training run's continuation).
        allowed = tuple(p for p in RESUMABLE_CHANGES if p != "tune.")
        changed = changes_since(previous, cfg, allowed)
        if changed:
            raise ConfigError([f"--resume: the search in {cfg.run_dir()} ran with another config (changed: "
                               f"{', '.join(changed)}); resume it with its own config (only "
                               f"{', '.join(p.rstrip('.') for p in allowed)} may change)"])


def _check_search_state_kept(cfg: Config, path: str, resume: bool) -> None:
    """Refuse the run directory of a search whose Ray Tune state is not at ``path``: it ran with
    another storage.storage_path, or its state was removed (ray/, which the README says may go once
    a search is done). A new search there would replace the old one's winner, trials.csv and report
    (and resuming the old one later, the new one's); --resume would find nothing. A search killed
    before Tune saved anything left only its config: nothing to keep, so nothing is refused."""
    run_dir, tune_dir = cfg.run_dir(), cfg.run_dir() / "tune"
    old, new = saved_storage_path(run_dir, "tune"), cfg.storage.storage_path
    old_path = f"{storage_location(old, run_dir, cfg.name)}/{EXPERIMENT_NAME}"
    new_search = f"choose another `name` (--set name=...) or remove {tune_dir}"
    if old_path != path and _search_saved(old_path):
        back = f"set storage.storage_path back to {old}" if old else "unset storage.storage_path again"
        raise ConfigError([
            f"--resume: storage.storage_path changed from {yaml_value(old)} to {yaml_value(new)}: the search in "
            f"{run_dir} keeps its Ray Tune state in {old_path}; to continue it, {back}" if resume else
            f"{run_dir} already holds a search, which keeps its Ray Tune state in {old_path} (storage.storage_path "
            f"{yaml_value(old)}), not in {path}: to continue it, {back} and add --resume; to start a new search, "
            f"{new_search}"])
    kept = [name for name in ("summary.json", "trials.csv", "best") if (tune_dir / name).exists()]
    if kept:
        raise ConfigError([
            f"--resume: the search in {run_dir} has no Ray Tune state left in {old_path} (removed?), so it cannot "
            f"be continued; to start a new search, {new_search}" if resume else
            f"{run_dir} already holds a search, whose Ray Tune state is gone from {old_path} (removed?): its "
            f"{', '.join(kept)} stay in {tune_dir}; to start a new search, {new_search}"])


def _scheduler(cfg: Config, epochs: int, num_trials: int, slots: int, history: Callable[[str], list[dict]],
               max_failures: int = 0):
    t = cfg.tune
    if t.scheduler == "fifo":
        return LimitedFIFO(slots=slots, max_failures=max_failures)
    # Keyed on the reported epoch, not Tune's training_iteration, which restarts after a resume;
    # both rebuild their rungs from the trials' epoch logs (``history``) on a resume.
    if t.scheduler == "halving":
        return SuccessiveHalving(metric=t.metric, mode=t.metric_mode, max_t=epochs, grace_period=t.grace_period,
                                 reduction_factor=t.reduction_factor, num_trials=num_trials, slots=slots,
                                 history=history, max_failures=max_failures)
    return ResumableASHA(history=history, stops=StopMarks(trials_root(cfg)), slots=slots, max_failures=max_failures,
                         time_attr="epoch", max_t=epochs, grace_period=t.grace_period,
                         reduction_factor=t.reduction_factor)


def _trial_history(root: str, trial_id: str) -> list[dict]:
    return list(read_epoch_log(epoch_log_path(root, trial_id)))


def _searcher(cfg: Config, max_concurrent: int, scheduler=None):
    t = cfg.tune
    if isinstance(scheduler, SuccessiveHalving):
        # Paused trials hold no slot: the scheduler counts the trials that train (check_search
        # keeps halving to the random searcher).
        return SlotGatedVariants(scheduler.has_free_slot, random_state=t.seed)
    if t.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return LimitedConcurrency(OptunaSearch(seed=t.seed), max_concurrent=max_concurrent)
    return LimitedVariants(random_state=t.seed, max_concurrent=max_concurrent)


# --- outputs: tune/trials.csv, tune/summary.json, tune/best/ ------------------------------------


def trial_rows(results, keys: list[str], epochs: int, trials_root: str) -> list[dict[str, Any]]:
    """One row per trial and epoch (the last report of an epoch wins), with the trial's final status.

    Read from each trial's epoch log (``trial.epoch_log_path``), written by its Train run before
    Tune hears of an epoch: Tune's own result files can miss the last epochs before a killed
    driver, and start afresh when a search is resumed.
    """
    rows = []
    for result in results:
        trial_id = result.metrics.get("trial_id") or Path(result.path).name
        records = list(read_epoch_log(epoch_log_path(trials_root, trial_id)))
        last_epoch = max((int(r["epoch"]) for r in records), default=None)
        status = ("error" if result.error else "not started" if last_epoch is None
                  else trial_status("TERMINATED", last_epoch, epochs))
        rows += epoch_rows(trial_id, trial_params(result), keys, records, status)
    # By trial and epoch: Tune returns the trials in another order after a resume.
    return sorted(rows, key=lambda r: (str(r["trial_id"]), r["epoch"] is not None, r["epoch"] or 0))


def trial_params(result) -> dict[str, Any]:
    """A trial's config: Tune's ``Result.config`` comes from the trial's last result, which a
    resumed search lacks for a trial that reported nothing after the resume (its results before a
    killed driver were not saved yet); then the params.json Tune wrote when the trial started."""
    if result.config:
        return result.config
    try:
        with result.filesystem.open_input_stream(f"{result.path}/params.json") as f:
            return json.loads(f.read())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def pick_best(rows: list[dict], metric: str, mode: str, filesystem=None) -> Optional[dict]:
    """The best epoch of any trial whose checkpoint is still kept; ties to the earlier epoch, then
    the lower trial id: the same results pick the same winner in any order (a resumed search's
    results come back in another). ``filesystem``: the storage's pyarrow filesystem when it is not
    local (s3://...), where the reported checkpoint paths live."""
    usable = [r for r in rows if r.get(metric) is not None and not _isnan(r[metric])
              and _checkpoint_exists(r.get("checkpoint_path"), filesystem)]
    return min(usable, key=lambda r: rank_key(r[metric], r["epoch"], r["trial_id"], mode)) if usable else None


def _checkpoint_exists(path: Any, filesystem=None) -> bool:
    # Train keeps only the best train.keep_checkpoints of each run and deletes the others.
    if not isinstance(path, str) or not path:
        return False
    if filesystem is not None:  # remote storage: the path is inside its filesystem
        import pyarrow.fs

        return filesystem.get_file_info(path).type == pyarrow.fs.FileType.Directory
    return not Path(path).is_absolute() or Path(path).is_dir()


def storage_filesystem(cfg: Config):
    """The pyarrow filesystem of a remote ``storage.storage_path`` (s3://...); None for local storage."""
    storage = cfg.resolved_storage_path()
    if "://" not in storage:
        return None
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(storage)[0]


def write_outputs(cfg: Config, base: Config, results, datasets, concurrent: int, started: float, resumed: bool,
                  log=print) -> dict[str, Any]:
    from rayfine.evaluate import evaluate_checkpoint

    t = cfg.tune
    keys, epochs = list(t.search_space), base.train.epochs
    tune_dir = cfg.run_dir() / "tune"
    tune_dir.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(results, keys, epochs, trials_root(cfg))
    columns = ["trial_id", *keys, *METRIC_KEYS, "status"]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(tune_dir / "trials.csv", table.getvalue())

    trials = {}
    for r in rows:
        trials.setdefault(r["trial_id"], r["status"])
    epochs_run = sum(1 for r in rows if r["epoch"] is not None)
    # The search as configured: trials that tune.time_budget_s kept Tune from creating count too.
    planned = max(count_trials(t), len(trials))
    summary: dict[str, Any] = {
        "num_trials": len(trials),
        "trials_planned": planned,
        "epochs_per_trial": epochs,
        "epochs_run": epochs_run,
        "epochs_full_budget": planned * epochs,
        "budget_fraction": epochs_run / max(1, planned * epochs),
        "wall_s": time.time() - started,
        "resumed": resumed,
        "scheduler": t.scheduler,
        "searcher": t.searcher,
        "metric": t.metric,
        "mode": t.metric_mode,
        "concurrent_trials": concurrent,
        "trials": {s: sum(1 for v in trials.values() if v == s) for s in sorted(set(trials.values()))},
        "best": None,
    }
    best = pick_best(rows, t.metric, t.metric_mode, storage_filesystem(cfg))
    if best is None:
        write_atomic(tune_dir / "summary.json", json_text(summary, indent=1))
        errors = [str(r.error).strip().splitlines()[-1] for r in results if r.error]
        raise TrainingError("the search finished without a usable checkpoint"
                            + (f"; {len(errors)} trial(s) failed, e.g.: {errors[0]}" if errors else ""))

    best_dir = tune_dir / "best"
    overrides = {k: best[k] for k in keys}
    winner = trial_config(base, overrides)
    exported = _export(best["checkpoint_path"], cfg, best_dir / "checkpoint")
    best_dir.mkdir(parents=True, exist_ok=True)
    # Its own name: `rayfine train` on this file trains the winner into a run directory of its own.
    reproduce = winner.with_overrides([f"name={cfg.name[: 100 - len(BEST_SUFFIX)]}{BEST_SUFFIX}"])
    write_atomic(best_dir / "config.yaml", reproduce.to_yaml())  # a cut file could still parse, as other settings
    log(f"[tune] best: trial {best['trial_id']} ({', '.join(f'{k}={v}' for k, v in overrides.items())}), "
        f"{t.metric} {best[t.metric]:.4f} at epoch {best['epoch']}")
    eval_started = time.time()
    evaluation = evaluate_checkpoint(exported, datasets["test"], best_dir, log=log)
    summary["eval_s"] = time.time() - eval_started  # the winner's test evaluation (`rayfine run` reports it apart)
    summary["best"] = {
        "trial_id": best["trial_id"],
        "overrides": overrides,
        "epoch": best["epoch"],
        **{k: best[k] for k in ("val_accuracy", "val_macro_f1", "val_loss", "train_loss")},
        "test_accuracy": evaluation["accuracy"],
        "test_macro_f1": evaluation["macro_f1"],
        "checkpoint": str(exported),
        "config": str(best_dir / "config.yaml"),
    }
    summary["wall_s"] = time.time() - started
    write_atomic(tune_dir / "summary.json", json_text(summary, indent=1))
    from rayfine.report import tune_report

    log(f"[tune] report: {tune_report(cfg.run_dir())}")
    of_planned = f" of {planned}" if planned > len(trials) else ""  # the time budget ran out first
    log(f"[tune] {summary['num_trials']}{of_planned} trials, {epochs_run}/{summary['epochs_full_budget']} epochs "
        f"({summary['budget_fraction']:.2f} of the full budget) in {summary['wall_s']:.0f}s -> {tune_dir}")
    return summary


def _export(checkpoint_path: str, cfg: Config, destination: Path) -> Path:
    # With remote storage (s3://...) Tune reports the path inside the storage filesystem.
    return export_best(ray.train.Checkpoint(checkpoint_path, filesystem=storage_filesystem(cfg)), destination, cfg)
