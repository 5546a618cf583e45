"""Resource planning for a search, before any trial starts (pure: no Ray needed).

    plan = plan_resources(trial_cfg, cfg.tune, num_trials=8, cluster=ray.cluster_resources())
    print(plan.describe())          # what one trial holds, how many run at once

Why plan at all: Tune reserves only a trial's own actor (0.01 CPU); the trial's Ray Train run
then reserves its workers separately, and Ray Data needs CPUs left over while training. If Tune
starts more trials than the cluster can hold, the late worker groups never get their CPUs and
the search hangs (RAY_NOTES.md, "Tune over distributed training"). So the number of concurrent
trials is fixed here, from what one trial really needs, and an impossible plan is refused with
the fields to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from rayfine.config import Config, ConfigError, TuneConfig, parse_search_spec

TRIAL_ACTOR_CPUS = 0.01  # the Tune trial actor only waits on its Train run; 0 is refused by Tune
EPS = 1e-9


@dataclass(frozen=True)
class ResourcePlan:
    num_workers: int
    cpus_per_worker: float
    data_cpus: float
    gpus_per_trial: int
    cluster_cpus: float
    cluster_gpus: float
    num_trials: int
    fits: int  # trials the cluster holds at once
    concurrent: int  # trials the search runs at once
    notes: list[str] = field(default_factory=list)

    @property
    def trial_cpus(self) -> float:
        return TRIAL_ACTOR_CPUS + self.num_workers * self.cpus_per_worker + self.data_cpus

    def describe(self) -> str:
        gpus = f", {self.gpus_per_trial} GPU" if self.gpus_per_trial else ""
        return (
            f"[tune] each trial: {self.trial_cpus:g} CPUs (trial actor {TRIAL_ACTOR_CPUS:g} + {self.num_workers} "
            f"worker(s) x {self.cpus_per_worker:g} + Ray Data {self.data_cpus:g}){gpus}; cluster: "
            f"{self.cluster_cpus:g} CPUs{f', {self.cluster_gpus:g} GPUs' if self.cluster_gpus else ''} -> "
            f"{self.num_trials} trial(s), {self.concurrent} at a time"
        )


def count_trials(tune_cfg: TuneConfig) -> int:
    """Trials the search starts: num_samples, times the size of the grid when there is one."""
    grid = 1
    for spec in tune_cfg.search_space.values():
        kind, args = parse_search_spec(spec)
        if kind == "grid":
            grid *= len(args)
    return tune_cfg.num_samples * grid


def plan_resources(trial_cfg: Config, tune_cfg: TuneConfig, num_trials: int, cluster: dict,
                   strict: bool = True) -> ResourcePlan:
    """How many trials of ``trial_cfg`` run at once on ``cluster`` (``ray.cluster_resources()``).

    strict (an embedded local Ray): a trial that cannot fit is a ConfigError naming the fields to
    change. Not strict (a cluster that may autoscale): a warning, and one trial at a time.
    """
    s = trial_cfg.scaling
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    need = TRIAL_ACTOR_CPUS + s.num_workers * s.cpus_per_worker + s.data_cpus
    gpus_per_trial = s.num_workers if s.use_gpu else 0
    cpu_fits = math.floor((cpus + EPS) / need)
    gpu_fits = math.floor((gpus + EPS) / gpus_per_trial) if gpus_per_trial else cpu_fits
    fits = min(cpu_fits, gpu_fits)
    problems, notes = [], []
    if need > cpus + EPS:
        problems.append(
            f"a trial needs {need:g} CPUs (trial actor {TRIAL_ACTOR_CPUS:g} + {s.num_workers} worker(s) x "
            f"{s.cpus_per_worker:g} CPU + {s.data_cpus:g} for Ray Data) but the cluster has {cpus:g}; lower "
            "scaling.num_workers, scaling.cpus_per_worker or scaling.data_cpus (for the search only: "
            "tune.trial_overrides, e.g. [scaling.num_workers=1])"
        )
    if gpus_per_trial > gpus:
        problems.append(
            f"a trial needs {gpus_per_trial} GPU(s) (scaling.num_workers with scaling.use_gpu) but the cluster "
            f"has {gpus:g}; set scaling.use_gpu=false or fewer scaling.num_workers (tune.trial_overrides)"
        )
    if problems:
        if strict:
            raise ConfigError(problems)
        notes += [f"[warning] {p} (waiting for the cluster to scale up)" for p in problems]
        fits = 1
    wanted: Optional[int] = tune_cfg.max_concurrent_trials
    concurrent = min(fits, wanted or fits, num_trials)
    if wanted and wanted > fits:
        held = (f"trials of {gpus_per_trial} GPU(s) fit in {gpus:g}" if gpu_fits < cpu_fits
                else f"trials of {need:g} CPUs fit in {cpus:g}")
        notes.append(f"[tune] tune.max_concurrent_trials={wanted} lowered to {fits}: that many {held}")
    return ResourcePlan(s.num_workers, s.cpus_per_worker, s.data_cpus, gpus_per_trial, cpus, gpus,
                        num_trials, fits, max(1, concurrent), notes)
