"""The baseline of train_overhead.py: a plain PyTorch DDP script, what a user writes without Ray.

    python bench/ddp_baseline.py DATA.npz CONFIG.json OUT.json [--epochs N]

Two processes (``torch.multiprocessing.spawn``) join a gloo process group on 127.0.0.1; each
takes its ``DistributedSampler`` shard of the same prepared tensors rayfine trained on (saved by
train_overhead.py), builds the same model with ``rayfine.models.build_model`` from the same
config, wraps it in ``DistributedDataParallel`` and trains with the same optimizer settings
(AdamW, no decay on biases and norms, linear warmup + cosine, gradient clipping), batch size and
loss. Every epoch ends with a validation pass whose counts are all-reduced, as rayfine's does.
Rank 0 writes, per epoch, the training-phase time and the samples trained by both ranks.
With ``world`` 1 the one process trains the model without the DDP wrapper, as a user's single-process
script does and as Ray Train's ``prepare_model`` leaves a one-worker run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time


def make_optimizer(model, cfg):
    import torch

    t = cfg.train
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr)


def make_scheduler(optimizer, cfg, total_steps: int):
    import torch

    warmup = int(cfg.train.warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def worker(rank: int, world: int, data_path: str, cfg_json: str, out_path: str, epochs: int, port: int,
           spawned_at: float) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from rayfine.config import Config
    from rayfine.models import build_model

    # As Ray does for a worker of < 2 CPUs (OMP_NUM_THREADS=1): one thread per process.
    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = Config.model_validate_json(cfg_json)
    t = cfg.train
    data = np.load(data_path)
    labels = [str(x) for x in data["labels"]]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, labels)
    if world > 1:  # one process trains the bare model, as Ray Train's prepare_model leaves it at one worker
        model = DistributedDataParallel(model)
    train = TensorDataset(torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"]))
    val = TensorDataset(torch.from_numpy(data["x_val"]), torch.from_numpy(data["y_val"]))
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    val_sampler = DistributedSampler(val, num_replicas=world, rank=rank, shuffle=False, drop_last=True)
    loader = DataLoader(train, batch_size=t.batch_size, sampler=sampler)
    val_loader = DataLoader(val, batch_size=t.eval_batch_size, sampler=val_sampler)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(loader) * epochs)
    epochs_out = []
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        epoch_started_at = time.time()
        started = time.perf_counter()
        model.train()
        seen, loss_sum = 0, 0.0
        for x, y in loader:
            logits = model(pixel_values=x)
            loss = F.cross_entropy(logits, y, label_smoothing=t.label_smoothing)
            loss.backward()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.item() * len(y)
            seen += len(y)
        train_s = time.perf_counter() - started
        model.eval()
        correct = total = 0
        with torch.inference_mode():
            for x, y in val_loader:
                correct += int((model(pixel_values=x).argmax(-1) == y).sum())
                total += len(y)
        counts = torch.tensor([seen, correct, total, loss_sum], dtype=torch.float64)
        dist.all_reduce(counts)
        epochs_out.append({"epoch": epoch, "started_at": epoch_started_at, "train_s": train_s,
                           "samples": int(counts[0]), "samples_per_s": float(counts[0]) / train_s,
                           "train_loss": float(counts[3] / counts[0]), "val_accuracy": float(counts[1] / counts[2]),
                           "epoch_s": time.perf_counter() - started})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"spawned_at": spawned_at, "epochs": epochs_out, "world": world,
                       "batch_size": t.batch_size, "torch_threads": torch.get_num_threads()}, f)
    dist.destroy_process_group()


def run(data_path: str, cfg_json: str, out_path: str, epochs: int, world: int = 2) -> dict:
    """Spawn ``world`` DDP processes and wait; returns rank 0's record (with ``spawned_at``)."""
    import torch.multiprocessing as mp

    from rayfine.runtime import free_port

    port = free_port()
    spawned_at = time.time()
    mp.spawn(worker, args=(world, data_path, cfg_json, out_path, epochs, port, spawned_at), nprocs=world, join=True)
    with open(out_path) as f:
        return json.load(f)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("--epochs", type=int, default=4)
    a = p.parse_args()
    with open(a.config) as f:
        record = run(a.data, f.read(), a.out, a.epochs)
    print(json.dumps(record["epochs"], indent=1))
    sys.exit(0)
