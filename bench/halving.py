"""Synchronous successive halving (tune.scheduler: halving) on the asha setting, against FIFO.

    python bench/halving.py             # results.json["halving"]; needs results.json["asha_curves"]
    python bench/halving.py --seeds 0   # only these seeds (recorded ones of the same setting are kept)
    python bench/halving.py --held-out 3,4   # results.json["halving_held_out"]: new seeds, FIFO run here too

For each seed of bench/asha.py's setting, `rayfine tune` (``run_search``, in-process, one embedded
local Ray) searches the same 16 configurations with ``tune.scheduler=halving`` at grace period 1
and reduction factor ETA (the setting bench/asha_replay.py's sweep singled out). The FIFO side is
the asha_curves record of the same seed: the same configurations trained to the end under FIFO on
this kind of machine (2 Intel Xeon CPUs), with the FIFO search's own winner and its test accuracy.
Not run again here: it takes 20-24 min a seed, and a rayfine trial is reproducible epoch by epoch,
which this script checks: every epoch the halving search trained must have the validation
accuracy the FIFO record has for that configuration and epoch (``reproduced``). So epochs and the
winners' test accuracies compare exactly; worker-seconds and wall time compare two runs (a ratio of
runs on different days, reported, not a headline).

The grace period and reduction factor were picked by bench/asha_replay.py's sweep on the curves of
seeds 0-2, so those seeds favour them. ``--held-out`` measures seeds the sweep never saw: both
searches run here, halving and then FIFO over the same configurations, side by side in one
embedded Ray, and the same reproducibility check compares them.
"""

from __future__ import annotations

import csv
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import asha
import common

ETA = 3
FULL = {**asha.FULL, "eta": ETA}
QUICK = {**asha.QUICK, "eta": ETA}
TOLERANCE = 1e-9


def epoch_rows(run_dir: Path, keys: list[str]) -> dict[tuple, list[dict]]:
    """trials.csv -> {(sampled values as floats): [{"epoch", "val_accuracy", "epoch_s"}, ...]}."""
    out: dict[tuple, list[dict]] = {}
    with (run_dir / "tune" / "trials.csv").open() as f:
        for row in csv.DictReader(f):
            rows = out.setdefault(tuple(float(row[k]) for k in keys), [])
            if row["epoch"]:
                rows.append({"epoch": int(row["epoch"]), "val_accuracy": float(row["val_accuracy"]),
                             "epoch_s": float(row["epoch_s"])})
    return out


def compare(halving: dict[tuple, list[dict]], curves: dict, keys: list[str]) -> dict:
    """The halving search's epochs against the FIFO record of the same seed (asha_curves' per_seed item)."""
    fifo = {tuple(float(t["config"][k]) for k in keys): t["epochs"] for t in curves["trials"]}
    if sorted(halving) != sorted(fifo):
        raise RuntimeError(f"halving and the FIFO record searched different configs:\n{sorted(halving)}\n{sorted(fifo)}")
    same = total = 0
    for config, rows in halving.items():
        for r in rows:
            total += 1
            same += abs(fifo[config][r["epoch"] - 1]["val_accuracy"] - r["val_accuracy"]) < TOLERANCE
    epochs = sum(len(rows) for rows in halving.values())
    full = sum(len(e) for e in fifo.values())
    return {
        "epochs": epochs, "epochs_fifo": full, "compute_ratio": epochs / full,
        "worker_s": sum(r["epoch_s"] for rows in halving.values() for r in rows),
        "worker_s_fifo": sum(e["epoch_s"] for epochs_ in fifo.values() for e in epochs_),
        "reproduced": same, "epochs_compared": total,
        "stopped_after": sorted(len(rows) for rows in halving.values()),
    }


def as_curves(rows: dict[tuple, list[dict]], keys: list[str]) -> dict:
    """A FIFO search's epoch_rows in the shape of an asha_curves seed record."""
    return {"trials": [{"config": dict(zip(keys, config)), "epochs": sorted(epochs, key=lambda e: e["epoch"])}
                       for config, epochs in rows.items()]}


def quiet(line: str) -> None:
    """The search's log, less its per-trial lines."""
    if not line.startswith("[tune] trial"):
        common.log(line)


def seed_item(seed: int, got: dict, best: dict, full_acc: float, wall_s: float) -> dict:
    """One seed's record: compare()'s figures, the halving winner (summary["best"]) and FIFO's test accuracy."""
    return {"seed": seed, **got, "worker_seconds_ratio": got["worker_s"] / got["worker_s_fifo"],
            "best_acc_halving": best["test_accuracy"], "best_acc_full": full_acc,
            "accuracy_gap": full_acc - best["test_accuracy"],
            "best_overrides": best["overrides"], "best_epoch": best["epoch"], "wall_s": wall_s}


def add_args(p) -> None:
    asha.add_seed_arg(p)
    p.add_argument("--held-out", help="comma-separated new seeds: FIFO runs here too (results.json['halving_held_out'])")


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0], extra=add_args)
    size = QUICK if args.quick else FULL
    if args.held_out:
        return held_out(args, size, [int(x) for x in args.held_out.split(",")])
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(size["seeds"])
    results = common.read_results(args.results)
    curves = results.get("asha_curves") or {}
    fifo_setting = asha.setting(asha.QUICK if args.quick else asha.FULL)
    if curves.get("setting") != fifo_setting:
        raise SystemExit("results.json has no asha_curves record of this setting: run bench/asha_curves.py first")
    by_seed = {s["seed"]: s for s in curves["per_seed"]}
    per_seed = asha.kept_seeds(results.get("halving") or {}, asha.setting(size), seeds) if args.seeds else []
    scratch = common.scratch_dir("halving")
    try:
        from rayfine.runtime import ray_session
        from rayfine.tune import run_search

        with ray_session(log=common.log):
            for seed in seeds:
                if seed not in by_seed:
                    raise SystemExit(f"seed {seed}: not in the asha_curves record")
                cfg = asha.search_config(size, "halving", seed, scratch)
                keys = list(cfg.tune.search_space)
                common.log(f"seed {seed}: halving (grace {size['grace']}, reduction factor {size['eta']}), "
                           f"{size['num_samples']} configs x {size['epochs']} epochs")
                started = time.perf_counter()
                summary = run_search(cfg, log=quiet)
                wall = time.perf_counter() - started
                got = compare(epoch_rows(cfg.run_dir(), keys), by_seed[seed], keys)
                full_acc = by_seed[seed]["fifo_best_test_accuracy"]
                item = seed_item(seed, got, summary["best"], full_acc, wall)
                common.log(f"  halving: {got['epochs']}/{got['epochs_fifo']} epochs, winner test accuracy "
                           f"{item['best_acc_halving']:.4f} (FIFO {full_acc:.4f}), {wall:.0f}s; "
                           f"{got['reproduced']}/{got['epochs_compared']} epochs as recorded under FIFO")
                per_seed.append(item)
                per_seed.sort(key=lambda s: s["seed"])
                write(args, size, per_seed)
                shutil.rmtree(cfg.run_dir(), ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def held_out(args, size: dict, seeds: list[int]) -> None:
    used = set(size["seeds"])
    if used & set(seeds):
        raise SystemExit(f"--held-out: seeds {sorted(used & set(seeds))} picked the setting; choose others")
    old = common.read_results(args.results).get("halving_held_out") or {}
    per_seed = asha.kept_seeds(old, asha.setting(size), seeds, ignore=("seeds",))
    scratch = common.scratch_dir("halving_held_out")
    try:
        from rayfine.runtime import ray_session
        from rayfine.tune import run_search

        with ray_session(log=common.log):
            for seed in seeds:
                runs = {}
                for scheduler in ("halving", "fifo"):
                    cfg = asha.search_config(size, scheduler, seed, scratch)
                    keys = list(cfg.tune.search_space)
                    common.log(f"seed {seed} (held out): {scheduler}, {size['num_samples']} configs x {size['epochs']} epochs")
                    started = time.perf_counter()
                    summary = run_search(cfg, log=quiet)
                    runs[scheduler] = {"summary": summary, "wall_s": time.perf_counter() - started,
                                       "rows": epoch_rows(cfg.run_dir(), keys)}
                    shutil.rmtree(cfg.run_dir(), ignore_errors=True)
                fifo_epochs = sum(len(r) for r in runs["fifo"]["rows"].values())
                if fifo_epochs != size["num_samples"] * size["epochs"]:
                    raise RuntimeError(f"seed {seed}: the FIFO search ran {fifo_epochs} epochs (interrupted?)")
                got = compare(runs["halving"]["rows"], as_curves(runs["fifo"]["rows"], keys), keys)
                h, f = runs["halving"]["summary"]["best"], runs["fifo"]["summary"]["best"]
                item = {**seed_item(seed, got, h, f["test_accuracy"], runs["halving"]["wall_s"]),
                        "wall_ratio": runs["halving"]["wall_s"] / runs["fifo"]["wall_s"],
                        "fifo_best_overrides": f["overrides"], "fifo_best_epoch": f["epoch"],
                        "fifo_wall_s": runs["fifo"]["wall_s"]}
                common.log(f"  seed {seed}: halving {got['epochs']}/{got['epochs_fifo']} epochs, winner test accuracy "
                           f"{h['test_accuracy']:.4f} (FIFO {f['test_accuracy']:.4f}); {got['reproduced']}/"
                           f"{got['epochs_compared']} epochs as under FIFO")
                per_seed.append(item)
                per_seed.sort(key=lambda s: s["seed"])
                write(args, size, per_seed, key="halving_held_out")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write(args, size: dict, per_seed: list[dict], key: str = "halving") -> None:
    stats = {k: common.summary(s[k] for s in per_seed)
             for k in ("compute_ratio", "worker_seconds_ratio", "best_acc_halving", "best_acc_full", "accuracy_gap",
                       "wall_s", "wall_ratio") if all(k in s for s in per_seed)}
    result = {k: stats[k]["median"] for k in ("compute_ratio", "accuracy_gap")}
    result.update({
        **{f"{k}_stats": v for k, v in stats.items()},
        "per_seed": per_seed, "setting": asha.setting(size), "repeats": len(per_seed),
        "seeds_done": [s["seed"] for s in per_seed],
        "goal": "compute_ratio <= 0.35 with accuracy_gap <= 0.005 (the asha goal)",
        "goal_met": result["compute_ratio"] <= 0.35 and result["accuracy_gap"] <= 0.005,
        "compared": (f"tune.scheduler=halving (grace {size['grace']}, reduction factor {size['eta']}) on the asha "
                     f"setting's {size['num_samples']} configs per seed / " + (
                         "the FIFO record of the same configs (asha_curves)" if key == "halving" else
                         "FIFO over the same configs, run in the same script (seeds the sweep that picked the "
                         "setting never saw)") + ": epochs, and the test accuracy of each search's winner"),
    })
    if key != "halving":
        result["setting"] = {**result["setting"], "seeds": [s["seed"] for s in per_seed]}
    common.write_result(args.results, key, result, args.quick)
    common.log(f"{key} ({len(per_seed)} seed(s)) compute_ratio {result['compute_ratio']:.3f}, "
               f"accuracy_gap {result['accuracy_gap']:+.4f}")


if __name__ == "__main__":
    main()
