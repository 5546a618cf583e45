"""Distributed fine-tuning with Ray Train (PyTorch DDP).

    from rayfine.config import load_config
    from rayfine.train import fit
    summary = fit(load_config("resnet18_digits"))      # inside ray.init() / rayfine.runtime.ray_session

Named by where the code runs (``worker.py``, ``driver.py``):
- ``train_loop_per_worker`` runs in every DDP worker: its shard of the data, the model, one
  validation and one checkpoint per epoch, resume from ``ray.train.get_checkpoint()``.
- ``build_trainer`` makes the ``TorchTrainer``; ``rayfine.tune`` calls it for every trial.
- ``fit`` runs on the driver: datasets, trainer, the run directory, the final test evaluation.
"""

from rayfine.train.driver import (
    RESUMABLE_CHANGES,
    MetricsLog,
    ShardedIngest,
    build_trainer,
    check_resources,
    class_weight_vector,
    fit,
    format_epoch,
    split_for_workers,
)
from rayfine.train.worker import METRIC_KEYS, make_optimizer, make_scheduler, train_loop_per_worker

__all__ = [
    "METRIC_KEYS", "MetricsLog", "RESUMABLE_CHANGES", "ShardedIngest", "build_trainer", "check_resources", "class_weight_vector",
    "fit", "format_epoch", "make_optimizer", "make_scheduler", "split_for_workers", "train_loop_per_worker",
]
