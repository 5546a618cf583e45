"""Evaluate a checkpoint on a dataset split (on the driver, streaming batches from Ray Data).

    from rayfine.evaluate import evaluate_checkpoint
    report = evaluate_checkpoint("runs/digits/train/checkpoint", datasets["test"], "runs/digits/train")

Writes eval.json, classification_report.txt and confusion_matrix.png into the output directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray.data

from rayfine import metrics
from rayfine.checkpoints import LoadedCheckpoint, load_checkpoint
from rayfine.progress import Progress
from rayfine.rundir import write_atomic


def predict_dataset(ckpt: LoadedCheckpoint, ds: ray.data.Dataset, batch_size: int = 256,
                    progress: Optional[Progress] = None, log_probs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Labels and class probabilities (``log_probs``: their logarithms) for every row of a model-input dataset."""
    from rayfine.data import batch_collate, model_batch

    y_true, probs = [], []
    collate = batch_collate(ckpt.cfg, str(ckpt.path))
    predict = ckpt.predict_log_proba if log_probs else ckpt.predict_proba
    for batch in ds.iter_torch_batches(batch_size=batch_size, device="cpu", collate_fn=collate):
        batch = model_batch(batch, ckpt.cfg.data)
        y_true.append(batch.pop("y").numpy())
        probs.append(predict(batch).cpu().numpy())  # a checkpoint loaded on a GPU answers there
        if progress is not None:
            progress.advance(len(y_true[-1]))
    if not y_true:
        return np.zeros(0, np.int64), np.zeros((0, len(ckpt.labels)), np.float32)
    return np.concatenate(y_true), np.concatenate(probs)


def evaluation_report(y_true: np.ndarray, probs: np.ndarray, labels: list[str], split: str,
                      log_probs: bool = False) -> dict[str, Any]:
    """The eval.json document (DESIGN.md's run-directory contract). ``log_probs``: ``probs`` holds
    log-probabilities, which give the loss exactly (cross-entropy, as the training's val_loss);
    from probabilities, one that underflows counts as 1e-12."""
    y_pred = probs.argmax(axis=1)
    counts = metrics.confusion(y_true, y_pred, len(labels))
    precision, recall, f1, support = metrics.per_class(counts)
    picked = probs[np.arange(len(y_true)), y_true]
    losses = -picked if log_probs else -np.log(np.clip(picked, 1e-12, 1.0))
    summary = metrics.summarize(counts)
    return {
        "split": split,
        "accuracy": summary["accuracy"],
        "macro_f1": summary["macro_f1"],
        "loss": float(losses.astype(np.float64).mean()) if len(y_true) else 0.0,
        "num_samples": int(len(y_true)),
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "confusion_matrix": counts.tolist(),
    }


def classification_report_text(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str], split: str) -> str:
    """scikit-learn's classification report over the classes in the split or predicted, the classes
    eval.json's macro_f1 averages; the others are named below the table."""
    from sklearn.metrics import classification_report

    seen = set(y_true.tolist()) | set(y_pred.tolist())
    present = [i for i in range(len(labels)) if i in seen] or list(range(len(labels)))
    text = classification_report(y_true, y_pred, labels=present, target_names=[labels[i] for i in present],
                                 digits=4, zero_division=0)
    absent = [label for i, label in enumerate(labels) if i not in present]
    if absent:
        text += f"\nnot in the {split} split and never predicted (left out of the averages): {', '.join(absent)}\n"
    return text


def evaluate_checkpoint(checkpoint_dir: str | Path, ds: ray.data.Dataset, out_dir: str | Path, split: str = "test",
                        log=print, num_samples: Optional[int] = None) -> dict[str, Any]:
    from rayfine.report import plot_confusion_matrix

    ckpt = load_checkpoint(checkpoint_dir)
    with Progress(total=num_samples or 0, desc=f"evaluating ({split})", log=log) as progress:
        y_true, log_probs = predict_dataset(ckpt, ds, ckpt.cfg.train.eval_batch_size, progress, log_probs=True)
    report = evaluation_report(y_true, log_probs, ckpt.labels, split, log_probs=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "eval.json", metrics.json_text(report, indent=1))
    text = classification_report_text(y_true, log_probs.argmax(axis=1), ckpt.labels, split)
    write_atomic(out_dir / "classification_report.txt", f"{split} split of {ckpt.cfg.data.source}\n\n{text}")
    plot_confusion_matrix(np.asarray(report["confusion_matrix"]), ckpt.labels, out_dir / "confusion_matrix.png", title=f"{ckpt.cfg.name}: {split}")
    log(f"[eval] {split}: accuracy {report['accuracy']:.4f}  macro_f1 {report['macro_f1']:.4f}  loss {report['loss']:.4f}  ({report['num_samples']} examples)")
    return report
