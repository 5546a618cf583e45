"""Learning curves of the ASHA benchmark's configurations, for replaying schedulers offline.

    python bench/asha_curves.py               # results.json["asha_curves"]: seeds 0, 1, 2
    python bench/asha_curves.py --seeds 0     # only these seeds (recorded ones are kept)
    python bench/asha_curves.py --quick       # 2 configs x 2 epochs (tests)

For each seed of bench/asha.py's setting, the FIFO search of the same sampled configurations runs
to the end with every epoch's checkpoint kept; then each checkpoint is evaluated on the test split.
Recorded per trial and epoch: validation accuracy and loss, the epoch's seconds, and the test
accuracy of that epoch's checkpoint. A trial of rayfine is reproducible epoch by epoch, and one
resumed from its checkpoint trains exactly as one that never stopped (tests/test_faults.py), so
these curves are what any scheduler would see of these configurations on this machine: a
scheduler replayed on them (bench/asha_replay.py) differs from a real run only in the order in
which trials reach their rungs. This is not the asha figure (bench/asha.py measures that); it is
the data that tells whether another stopping rule would meet its goal before one is built.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import asha
import common


def trial_curves(run_dir: Path, test_split, keys: list[str]) -> list[dict]:
    """Every trial's epochs (from its epoch log) with the test accuracy of each epoch's checkpoint."""
    from rayfine.checkpoints import load_checkpoint
    from rayfine.evaluate import predict_dataset

    trials = []
    for log in sorted((run_dir / "ray" / "trials").glob("trial_*/epochs.jsonl")):
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        epochs = []
        for row in rows:
            ckpt = load_checkpoint(row["checkpoint_path"])
            y, probs = predict_dataset(ckpt, test_split)
            epochs.append({"epoch": row["epoch"], "val_accuracy": row["val_accuracy"], "val_loss": row["val_loss"],
                           "epoch_s": row["epoch_s"], "test_accuracy": float((probs.argmax(1) == y).mean())})
        trials.append({"trial": log.parent.name.removeprefix("trial_"), "epochs": epochs})
    with (run_dir / "tune" / "trials.csv").open() as f:
        config = {r["trial_id"]: {k: float(r[k]) for k in keys} for r in csv.DictReader(f)}
    for t in trials:
        t["config"] = config[t["trial"]]
    return trials


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0], extra=asha.add_seed_arg)
    size = asha.QUICK if args.quick else asha.FULL
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(size["seeds"])
    old = common.read_results(args.results).get("asha_curves") or {}
    per_seed = asha.kept_seeds(old, asha.setting(size), seeds) if args.seeds else []
    scratch = common.scratch_dir("asha_curves")
    try:
        from rayfine.data import build_datasets
        from rayfine.runtime import ray_session
        from rayfine.tune import run_search

        with ray_session(log=common.log):
            for seed in seeds:
                cfg = asha.search_config(size, "fifo", seed, scratch)
                # Keep every epoch's checkpoint: the replayed winner may be any trial's any epoch.
                keep_all = [*cfg.tune.trial_overrides, f"train.keep_checkpoints={size['epochs']}"]
                cfg = cfg.with_overrides([f"tune.trial_overrides={json.dumps(keep_all)}"])
                common.log(f"seed {seed}: FIFO, {size['num_samples']} configs x {size['epochs']} epochs, every checkpoint kept")
                summary = run_search(cfg, log=lambda line: None if line.startswith("[tune] trial") else common.log(line))
                base = cfg.with_overrides(list(cfg.tune.trial_overrides))
                datasets, _ = build_datasets(base, log=lambda *_: None)
                trials = trial_curves(cfg.run_dir(), datasets["test"], list(cfg.tune.search_space))
                epochs = sum(len(t["epochs"]) for t in trials)
                if epochs != size["num_samples"] * size["epochs"]:
                    raise RuntimeError(f"seed {seed}: the FIFO search ran {epochs} epochs (interrupted?)")
                per_seed.append({"seed": seed, "trials": trials, "test_rows": datasets["test"].count(),
                                 "val_rows": datasets["val"].count(),
                                 "fifo_best_test_accuracy": summary["best"]["test_accuracy"]})
                per_seed.sort(key=lambda s: s["seed"])
                common.write_result(args.results, "asha_curves", {
                    "setting": asha.setting(size), "per_seed": per_seed, "seeds_done": [s["seed"] for s in per_seed],
                    "compared": "per-epoch validation and test figures of every configuration of the asha setting "
                                "(FIFO, every checkpoint evaluated on the test split): the input of bench/asha_replay.py",
                }, args.quick)
                shutil.rmtree(cfg.run_dir(), ignore_errors=True)  # ~17 GB of checkpoints per seed
                common.log(f"  seed {seed}: {epochs} epochs recorded; FIFO winner test accuracy "
                           f"{summary['best']['test_accuracy']:.4f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
