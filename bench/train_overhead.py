"""Training overhead: rayfine's loop under Ray Train (2 workers) vs a plain PyTorch DDP script.

    python bench/train_overhead.py            # results.json["train_overhead"]
    python bench/train_overhead.py --quick    # the tiny preset, 2 epochs, one repeat (tests)

Both sides train the same model (``build_model`` on the resnet18_digits config, augmentation off
so that both do exactly the same work per sample), on the same prepared digits tensors (rayfine's
own model-input datasets, saved once for the baseline), with the same per-worker batch size, on
2 workers of one thread each (Ray sets OMP_NUM_THREADS=1 for a 0.75-CPU worker; the baseline sets
torch threads to 1).

- rayfine: ``build_datasets`` + ``build_trainer(...).fit()`` on an embedded local Ray: Ray Data
  streams each worker its shard, ``train_loop_per_worker`` trains, validates, checkpoints and
  reports every epoch.
- baseline: bench/ddp_baseline.py, 2 gloo processes from ``torch.multiprocessing.spawn``, each a
  ``DistributedSampler`` shard of in-memory tensors; run while no Ray is up.

Steady state: samples/s of the training phase of every epoch after the first (the first holds
warm-up: allocator, gloo buckets, Ray Data's first blocks), as rayfine's metrics.jsonl reports it
(samples of all ranks / rank 0's training time); the baseline measures the same thing. Reported
apart: start-up (from fit()/spawn to the start of epoch 1) and whole-epoch throughput (training,
validation and, for rayfine, its per-epoch checkpoint and report).

``one_worker``: the same pair at one worker against one plain process (no DDP on either side), run
right after each two-worker pair. On a 2-CPU machine two workers leave Ray's own processes no CPU
of their own; one worker leaves them one, so the two ratios together tell the cost of rayfine's
loop under Ray Train from the cost of sharing the CPUs with Ray.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import ddp_baseline

FULL = {"preset": "resnet18_digits", "epochs": 6, "repeats": 3, "extra": []}
QUICK = {"preset": "resnet18_digits_tiny", "epochs": 2, "repeats": 1, "extra": ["data.subsample=0.2"]}
WORKERS = (2, 1)  # the headline pair, then one_worker


def make_config(size: dict, runs_dir: Path, workers: int = 2):
    from rayfine.config import load_config

    return load_config(size["preset"], [
        "name=overhead", f"storage.runs_dir={runs_dir}", f"train.epochs={size['epochs']}", "data.augment=false",
        f"scaling.num_workers={workers}", "tracking.tensorboard=false", *size["extra"],
    ])


def stamped_loop(path: str):
    """rayfine's train_loop_per_worker, with rank 0 writing the wall-clock time of each epoch's
    report as it calls ``ray.train.report``. (A Train callback's after_report runs when the Train
    controller polls the workers, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: 0.5 s on rayfine's
    embedded Ray, 2 s by Ray's default; its times would put that polling into every epoch and into
    the start-up.)"""

    def loop(config: dict) -> None:
        import ray.train

        from rayfine.train.worker import train_loop_per_worker

        report = ray.train.report

        def stamped_report(metrics: dict, *args, **kwargs):
            if ray.train.get_context().get_world_rank() == 0:
                with open(path, "a") as f:
                    f.write(json.dumps({"t": time.time(), **metrics}) + "\n")
            return report(metrics, *args, **kwargs)

        ray.train.report = stamped_report  # the worker's own process: rayfine calls ray.train.report(...)
        try:
            train_loop_per_worker(config)
        finally:
            ray.train.report = report

    return loop


def save_tensors(datasets, info, cfg, path: Path) -> None:
    """rayfine's own model-input tensors (train and val) for the baseline, normalized once (rayfine
    normalizes each batch in its training loop)."""
    import torch

    from rayfine.data import model_batch

    arrays = {}
    for split in ("train", "val"):
        rows = datasets[split].take_all()
        batch = model_batch({"image": torch.from_numpy(np.stack([r["image"] for r in rows]))}, cfg.data)
        arrays[f"x_{split}"] = batch["pixel_values"].numpy()
        arrays[f"y_{split}"] = np.array([r["y"] for r in rows], dtype=np.int64)
    np.savez(path, labels=np.array(info.labels), **arrays)


def rayfine_run(cfg, scratch: Path, repeat: int, tensors: Path) -> dict:
    import ray

    from rayfine.data import build_datasets
    from rayfine.runtime import ray_session
    from rayfine.train import build_trainer

    t0 = time.perf_counter()
    with ray_session(log=common.log):
        ray_init_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        datasets, info = build_datasets(cfg, log=common.log)
        data_s = time.perf_counter() - t1
        if not tensors.exists():
            save_tensors(datasets, info, cfg, tensors)
        stamps = scratch / f"stamps-{cfg.scaling.num_workers}w-{repeat}.jsonl"
        trainer = build_trainer(cfg, datasets, info, name=f"overhead-{cfg.scaling.num_workers}w-{repeat}",
                                storage_path=str(scratch / "ray"),
                                train_loop=stamped_loop(str(stamps)))
        fit_started = time.time()
        result = trainer.fit()
        fit_s = time.time() - fit_started
        if result.error:
            raise RuntimeError(f"rayfine training failed: {result.error}")
        threads = ray.cluster_resources().get("CPU")
    epochs = [json.loads(line) for line in stamps.read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == list(range(1, cfg.train.epochs + 1)), epochs
    startup = epochs[0]["t"] - epochs[0]["epoch_s"] - fit_started
    # Whole epochs: from one report to the next (training, validation, checkpoint, report).
    walls = [b["t"] - a["t"] for a, b in zip(epochs, epochs[1:])]
    # Equal shards (rayfine.train.ShardedIngest): every worker gets num_train // workers rows.
    seen = info.num_examples["train"] // cfg.scaling.num_workers * cfg.scaling.num_workers
    return {
        "ray_init_s": ray_init_s, "data_s": data_s, "startup_s": startup, "fit_s": fit_s, "cluster_cpus": threads,
        "steady_samples_per_s": float(np.median([e["samples_per_s"] for e in epochs[1:]])),
        "first_epoch_samples_per_s": epochs[0]["samples_per_s"],
        "steady_epoch_samples_per_s": float(np.median([seen / w for w in walls])),
        "val_accuracy_last": epochs[-1]["val_accuracy"],
    }


def baseline_run(cfg, tensors: Path, scratch: Path, repeat: int) -> dict:
    world = cfg.scaling.num_workers
    out = scratch / f"ddp-{world}w-{repeat}.json"
    record = ddp_baseline.run(str(tensors), cfg.model_dump_json(), str(out), cfg.train.epochs, world=world)
    epochs = record["epochs"]
    return {
        "startup_s": epochs[0]["started_at"] - record["spawned_at"],
        "steady_samples_per_s": float(np.median([e["samples_per_s"] for e in epochs[1:]])),
        "first_epoch_samples_per_s": epochs[0]["samples_per_s"],
        "steady_epoch_samples_per_s": float(np.median([e["samples"] / e["epoch_s"] for e in epochs[1:]])),
        "val_accuracy_last": epochs[-1]["val_accuracy"],
        "torch_threads": record["torch_threads"],
    }


def pair(cfg, tensors: Path, scratch: Path, repeat: int) -> dict:
    """One rayfine run and one plain run of the same config, back to back."""
    workers = cfg.scaling.num_workers
    common.log(f"  rayfine (Ray Train, {workers} worker{'s' if workers > 1 else ''})")
    ours = rayfine_run(cfg, scratch, repeat, tensors)
    common.log(f"    rayfine: {ours['steady_samples_per_s']:.0f} samples/s steady, start-up {ours['startup_s']:.1f}s")
    common.log(f"  plain PyTorch ({f'DDP, {workers} gloo processes' if workers > 1 else 'one process'})")
    theirs = baseline_run(cfg, tensors, scratch, repeat)
    common.log(f"    plain: {theirs['steady_samples_per_s']:.0f} samples/s steady, start-up {theirs['startup_s']:.1f}s")
    return {"rayfine": ours, "ddp": theirs,
            "ratio": ours["steady_samples_per_s"] / theirs["steady_samples_per_s"],
            "epoch_ratio": ours["steady_epoch_samples_per_s"] / theirs["steady_epoch_samples_per_s"]}


def figures(runs: list[dict]) -> dict:
    """The ratios and both sides' rates of a list of pairs (median and spread)."""
    ratios = common.summary(r["ratio"] for r in runs)
    return {
        "ratio": ratios["median"],
        "ratio_stats": ratios,
        "epoch_ratio": common.summary(r["epoch_ratio"] for r in runs)["median"],
        "epoch_ratio_stats": common.summary(r["epoch_ratio"] for r in runs),
        "rayfine_samples_per_s": common.summary(r["rayfine"]["steady_samples_per_s"] for r in runs),
        "ddp_samples_per_s": common.summary(r["ddp"]["steady_samples_per_s"] for r in runs),
        "rayfine_startup_s": common.summary(r["rayfine"]["startup_s"] for r in runs),
        "ddp_startup_s": common.summary(r["ddp"]["startup_s"] for r in runs),
        "rayfine_ray_init_s": common.summary(r["rayfine"]["ray_init_s"] for r in runs),
        "rayfine_data_s": common.summary(r["rayfine"]["data_s"] for r in runs),
        "runs": runs,
    }


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    size = QUICK if args.quick else FULL
    scratch = common.scratch_dir("train_overhead")
    configs = {w: make_config(size, scratch / "runs", w) for w in WORKERS}
    tensors = scratch / "tensors.npz"
    runs: dict[int, list[dict]] = {w: [] for w in WORKERS}
    try:
        for repeat in range(size["repeats"]):
            for w in WORKERS:
                common.log(f"repeat {repeat + 1}/{size['repeats']}, {w} worker{'s' if w > 1 else ''}")
                runs[w].append(pair(configs[w], tensors, scratch, repeat))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    cfg, two = configs[2], figures(runs[2])
    result = {
        **two,
        "config": {"preset": size["preset"], "epochs": cfg.train.epochs, "steady_epochs": cfg.train.epochs - 1,
                   "batch_size_per_worker": cfg.train.batch_size, "workers": 2, "image_size": cfg.data.image_size,
                   "augment": False},
        "repeats": size["repeats"],
        "goal": ">= 0.95",
        "goal_met": two["ratio"] >= 0.95,
        "compared": ("steady-state training samples/s (epochs 2..N, training phase) of rayfine's train_loop_per_worker "
                     "under Ray Train with 2 workers / a plain PyTorch DDP script with 2 gloo processes "
                     f"(torch.multiprocessing), same model ({cfg.model.name}, build_model), same prepared digits tensors, "
                     f"batch {cfg.train.batch_size} per worker"),
        "one_worker": {
            **figures(runs[1]),
            "compared": ("the same at 1 worker / 1 plain process (no DDP on either side), run right after each "
                         "2-worker pair: Ray's own processes have a CPU of their own"),
        },
    }
    common.write_result(args.results, "train_overhead", result, args.quick)
    common.log(f"train_overhead ratio {result['ratio']:.3f}, whole-epoch ratio {result['epoch_ratio']:.3f}; "
               f"one worker {result['one_worker']['ratio']:.3f}")


if __name__ == "__main__":
    main()
