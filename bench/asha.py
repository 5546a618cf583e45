"""ASHA vs FIFO: the same sampled configurations searched with early stopping and to the end.

    python bench/asha.py            # results.json["asha"]
    python bench/asha.py --quick    # 2 configs x 2 epochs, one seed (tests)
    python bench/asha.py --seeds 1,2  # only these seeds; seeds already in the results file
                                      # (same setting) are kept, so a long run can be split

For each search seed, `rayfine tune` (``run_search``, in-process, one embedded local Ray for all
searches) runs the same NUM_SAMPLES configurations (the random searcher with ``tune.seed`` = the
seed draws them; the script checks both searches got the same ones) twice on builtin:digits:
  - ASHA (grace period GRACE, reduction factor ETA, max_t = EPOCHS), and
  - FIFO: every trial to EPOCHS epochs (the full budget).
Figures per seed: compute_ratio = epochs ASHA trained / epochs FIFO trained; the same with
worker-seconds (the sum of each trial epoch's ``epoch_s`` x its workers); best_acc_asha and
best_acc_full = test accuracy of each search's winner (picked by validation accuracy, evaluated on
the held-out test split by the search itself); accuracy_gap = best_acc_full - best_acc_asha.
Reported: the median and spread over SEEDS seeds (asynchronous ASHA depends on trial arrival order).
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

FULL = {"seeds": (0, 1, 2), "num_samples": 16, "epochs": 8, "grace": 1, "eta": 2, "image_size": 8, "extra": []}
QUICK = {"seeds": (0,), "num_samples": 2, "epochs": 2, "grace": 1, "eta": 2, "image_size": 8,
         "extra": ["data.subsample=0.2"]}
WORKERS, CPUS_PER_WORKER, DATA_CPUS = 1, 0.6, 0.3


def search_config(size: dict, scheduler: str, seed: int, runs_dir: Path):
    from rayfine.config import load_config

    return load_config("resnet18_digits", [
        f"name=asha-{scheduler}-seed{seed}", f"storage.runs_dir={runs_dir}", "tracking.tensorboard=false",
        f"data.image_size={size['image_size']}",
        f"tune.num_samples={size['num_samples']}", f"tune.seed={seed}", f"tune.scheduler={scheduler}",
        f"tune.grace_period={size['grace']}", f"tune.reduction_factor={size['eta']}",
        f"tune.trial_overrides=[train.epochs={size['epochs']}, scaling.num_workers={WORKERS}, "
        f"scaling.cpus_per_worker={CPUS_PER_WORKER}, scaling.data_cpus={DATA_CPUS}]",
        *size["extra"],
    ])


def read_trials(run_dir: Path, keys: list[str]) -> dict[str, dict]:
    """trials.csv -> {trial_id: {"config": (sampled values), "epochs": n, "epoch_s": total, "status"}}."""
    trials: dict[str, dict] = {}
    with (run_dir / "tune" / "trials.csv").open() as f:
        for row in csv.DictReader(f):
            t = trials.setdefault(row["trial_id"], {"config": tuple(row[k] for k in keys), "epochs": 0,
                                                    "epoch_s": 0.0, "status": row["status"]})
            if row["epoch"]:
                t["epochs"] += 1
                t["epoch_s"] += float(row["epoch_s"])
    return trials


def held_seconds(cfg) -> float:
    """Seconds the trials held their resources, each from its start to its last result (Tune's
    ``time_total_s`` in the trial's result.json), summed: each trial's Ray Train worker group start
    included, which every trial pays, stopped early or not."""
    from rayfine.tune.search import experiment_path

    total = 0.0
    for path in Path(experiment_path(cfg)).glob("*/result.json"):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if lines:
            total += float(json.loads(lines[-1]).get("time_total_s") or 0.0)
    return total


def one_search(size: dict, scheduler: str, seed: int, runs_dir: Path) -> dict:
    from rayfine.tune import run_search

    cfg = search_config(size, scheduler, seed, runs_dir)
    started = time.perf_counter()
    summary = run_search(cfg, log=lambda line: None if line.startswith("[tune] trial") else common.log(line))
    wall = time.perf_counter() - started
    trials = read_trials(cfg.run_dir(), list(cfg.tune.search_space))
    return {
        "epochs": sum(t["epochs"] for t in trials.values()),
        "epochs_full_budget": summary["epochs_full_budget"],
        "worker_s": sum(t["epoch_s"] for t in trials.values()) * WORKERS,
        "held_worker_s": held_seconds(cfg) * WORKERS,
        "best_test_accuracy": summary["best"]["test_accuracy"],
        "best_val_accuracy": summary["best"]["val_accuracy"],
        "best_overrides": summary["best"]["overrides"],
        "best_epoch": summary["best"]["epoch"],
        "trials": summary["trials"],
        "configs": sorted(t["config"] for t in trials.values()),
        "stopped_after": sorted(t["epochs"] for t in trials.values()),
        "wall_s": wall,
    }


def add_seed_arg(p) -> None:
    p.add_argument("--seeds", help="comma-separated seeds to run now (default: all of the setting's seeds); "
                                   "seeds already recorded with the same setting are kept")


def kept_seeds(old: dict, this_setting: dict, run_now: list[int], ignore: tuple[str, ...] = ()) -> list[dict]:
    """Per-seed results of a results-file record (``old``) of this very setting (keys in ``ignore``
    aside), minus the seeds run now: what a run of some seeds keeps of the others."""
    def key(s):
        return {k: v for k, v in (s or {}).items() if k not in ignore}

    same = key(old.get("setting")) == key(this_setting) and not old.get("quick")
    return [s for s in old.get("per_seed", []) if same and s["seed"] not in run_now]


def recorded_seeds(args, size: dict, run_now: list[int]) -> list[dict]:
    """Per-seed results already in the results file for this very setting, minus the seeds run now."""
    return kept_seeds(common.read_results(args.results).get("asha") or {}, setting(size), run_now)


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0], extra=add_seed_arg)
    size = QUICK if args.quick else FULL
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(size["seeds"])
    unknown = sorted(set(seeds) - set(size["seeds"]))
    if unknown:
        raise SystemExit(f"--seeds: {unknown} not in this setting's seeds {list(size['seeds'])}")
    per_seed = recorded_seeds(args, size, seeds) if args.seeds else []
    if per_seed:
        common.log(f"keeping recorded seed(s) {[s['seed'] for s in per_seed]}")
    scratch = common.scratch_dir("asha")
    try:
        from rayfine.runtime import ray_session

        with ray_session(log=common.log):
            for seed in seeds:
                common.log(f"seed {seed}: ASHA, {size['num_samples']} configs x {size['epochs']} epochs")
                asha = one_search(size, "asha", seed, scratch)
                common.log(f"  ASHA: {asha['epochs']} epochs, winner test accuracy {asha['best_test_accuracy']:.4f}, "
                           f"{asha['wall_s']:.0f}s; stopped after {asha['stopped_after']}")
                common.log(f"seed {seed}: FIFO, the same configs to {size['epochs']} epochs")
                fifo = one_search(size, "fifo", seed, scratch)
                common.log(f"  FIFO: {fifo['epochs']} epochs, winner test accuracy {fifo['best_test_accuracy']:.4f}, "
                           f"{fifo['wall_s']:.0f}s")
                if fifo["epochs"] != size["num_samples"] * size["epochs"]:
                    # An interrupted search (Ctrl-C ends Tune's run and returns) must not count as a seed.
                    raise RuntimeError(f"seed {seed}: the FIFO search ran {fifo['epochs']} of "
                                       f"{size['num_samples'] * size['epochs']} epochs (interrupted?)")
                if asha["configs"] != fifo["configs"]:
                    raise RuntimeError(f"seed {seed}: ASHA and FIFO searched different configs:\n"
                                       f"{asha['configs']}\n{fifo['configs']}")
                per_seed.append({
                    "seed": seed,
                    "compute_ratio": asha["epochs"] / fifo["epochs"],
                    "worker_seconds_ratio": asha["worker_s"] / fifo["worker_s"],
                    "held_worker_seconds_ratio": asha["held_worker_s"] / fifo["held_worker_s"],
                    "wall_ratio": asha["wall_s"] / fifo["wall_s"],
                    "best_acc_asha": asha["best_test_accuracy"],
                    "best_acc_full": fifo["best_test_accuracy"],
                    "accuracy_gap": fifo["best_test_accuracy"] - asha["best_test_accuracy"],
                    "asha": {k: v for k, v in asha.items() if k != "configs"},
                    "fifo": {k: v for k, v in fifo.items() if k not in ("configs", "stopped_after")},
                })
                per_seed.sort(key=lambda s: s["seed"])
                write(args, size, per_seed)  # after every seed: an interrupted run keeps what it finished
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not per_seed:
        raise SystemExit("no seed finished")


def setting(size: dict) -> dict:
    return {"dataset": "builtin:digits", "model": "resnet18 (small stem)", "image_size": size["image_size"],
            "configs_per_seed": size["num_samples"], "seeds": list(size["seeds"]), "max_epochs": size["epochs"],
            "grace_period": size["grace"], "reduction_factor": size["eta"],
            "search_space": "train.lr loguniform [1e-4, 2e-3] x train.batch_size {16, 32, 64}",
            "trial_resources": f"{WORKERS} worker x {CPUS_PER_WORKER} CPU + {DATA_CPUS} CPU Ray Data + 0.01 trial actor",
            "extra_overrides": size["extra"]}


def write(args, size: dict, per_seed: list[dict]) -> None:
    def stat(key: str) -> dict:
        return common.summary(s[key] for s in per_seed)

    result = {k: stat(k)["median"] for k in ("compute_ratio", "worker_seconds_ratio", "best_acc_asha", "best_acc_full",
                                            "accuracy_gap")}
    result.update({
        **{f"{k}_stats": stat(k) for k in ("compute_ratio", "worker_seconds_ratio", "wall_ratio", "best_acc_asha",
                                           "best_acc_full", "accuracy_gap")},
        # Recorded since 2026-12-05 16:30 (a seed recorded before has none).
        **({"held_worker_seconds_ratio_stats": stat("held_worker_seconds_ratio")}
           if all("held_worker_seconds_ratio" in s for s in per_seed) else {}),
        "per_seed": per_seed,
        "setting": setting(size),
        "repeats": len(per_seed),
        "seeds_done": [s["seed"] for s in per_seed],
        "partial": len(per_seed) < len(size["seeds"]),
        "goal": "compute_ratio <= 0.35 with accuracy_gap <= 0.005",
        "goal_met": result["compute_ratio"] <= 0.35 and result["accuracy_gap"] <= 0.005,
        "compared": (f"the same {size['num_samples']} sampled configs per seed under ASHA and under FIFO to "
                     f"{size['epochs']} epochs: epochs (and worker-seconds) ASHA / FIFO; test accuracy of each "
                     "search's winner"),
    })
    common.write_result(args.results, "asha", result, args.quick)
    common.log(f"asha ({len(per_seed)} seed(s)) compute_ratio {result['compute_ratio']:.3f}, "
               f"accuracy_gap {result['accuracy_gap']:+.4f}")


if __name__ == "__main__":
    main()
