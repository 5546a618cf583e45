"""Classification metrics from a confusion matrix.

Workers each count a confusion matrix over their shard; the matrices are summed across ranks
(all-reduce) and only then turned into accuracy and macro F1, so the reported figures are those of
the whole validation split, not of rank 0's part of it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

# What each epoch reports (metrics.jsonl, epochs.jsonl, trials.csv, the reports, MLflow and TensorBoard).
METRIC_KEYS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "samples_per_s", "epoch_s")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """counts[i, j] = examples of true label i predicted as j."""
    flat = np.asarray(y_true, np.int64) * num_labels + np.asarray(y_pred, np.int64)
    return np.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def add_confusion(counts: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray) -> None:
    """``counts += confusion(y_true, y_pred)`` in place, in the batch's time rather than the matrix's:
    a validation batch of 256 with 10,000 labels would otherwise build a 760 MiB matrix."""
    np.add.at(counts, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)


def per_class(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support per class (0 where undefined, as scikit-learn does)."""
    counts = counts.astype(np.float64)
    tp = np.diag(counts)
    predicted = counts.sum(axis=0)
    support = counts.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support


def summarize(counts: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 (over classes present in the split or predicted)."""
    total = counts.sum()
    _, _, f1, support = per_class(counts)
    present = (support > 0) | (counts.sum(axis=0) > 0)
    return {
        "accuracy": float(np.trace(counts) / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }


def is_finite_number(value: Any) -> bool:
    """A metric value that can rank: a number, not a bool, not NaN or infinite (a diverged epoch)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float in it (a diverged epoch's NaN loss, an infinite one)
    made None, and NumPy scalars and arrays made Python numbers and lists."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(value: Any, indent: int | None = None) -> str:
    """The JSON text of the run directory's metric files (metrics.jsonl, metrics.json, eval.json,
    summary.json): a non-finite value is written as null. RFC 8259 has no NaN or Infinity, so jq,
    JavaScript's JSON.parse and Go refuse the bare NaN that Python's json module writes."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False)


def nan_for_null(record: dict[str, Any], keys) -> dict[str, Any]:
    """A record read back from a file ``json_text`` wrote, its null made NaN again under the metric
    ``keys`` (a number was written there: Ray Train, Tune's schedulers and the trackers need one)."""
    return {k: math.nan if v is None and k in keys else v for k, v in record.items()}
