"""Classification metrics from a confusion matrix.

Workers each count a confusion matrix over their shard; the matrices are summed across ranks
(all-reduce) and only then turned into accuracy and macro F1, so the reported figures are those of
the whole validation split, not of rank 0's part of it.
"""

from __future__ import annotations

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> np.ndarray:
    """counts[i, j] = examples of true label i predicted as j."""
    flat = np.asarray(y_true, np.int64) * num_labels + np.asarray(y_pred, np.int64)
    return np.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


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
