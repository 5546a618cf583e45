"""Confusion-matrix metrics agree with scikit-learn (unit tier)."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from rayfine import metrics


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n_labels = 6
    y_true = rng.integers(0, n_labels - 1, 200)  # the last label never occurs...
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, n_labels, 200))  # ...but is predicted
    counts = metrics.confusion(y_true, y_pred, n_labels)
    summary = metrics.summarize(counts)
    assert summary["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert summary["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    p, r, f, s = metrics.per_class(counts)
    ref = precision_recall_fscore_support(y_true, y_pred, labels=range(n_labels), zero_division=0)
    for ours, theirs in zip((p, r, f, s), ref):
        assert np.allclose(ours, theirs)


def test_summed_shards_equal_the_whole():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 4, 100), rng.integers(0, 4, 100)
    whole = metrics.confusion(y_true, y_pred, 4)
    parts = metrics.confusion(y_true[:37], y_pred[:37], 4) + metrics.confusion(y_true[37:], y_pred[37:], 4)
    assert np.array_equal(whole, parts)


def test_label_names_are_plotted_as_text_not_mathtext(tmp_path):
    """Price tiers "$" .. "$$$$" are labels, not matplotlib mathtext (which raised on them)."""
    from rayfine.report import plot_confusion_matrix

    labels = ["$", "$$", "$$$", "$$$$"]
    path = plot_confusion_matrix(np.eye(4, dtype=np.int64) * 3, labels, tmp_path / "cm.png")
    assert path.stat().st_size > 0


def test_trial_ids_read_back_as_written(tmp_path):
    """Tune's ids are 5 hex digits and a counter; float() reads "12345_00001" as a number."""
    from rayfine.report import read_trials

    (tmp_path / "trials.csv").write_text("trial_id,status,epoch,val_accuracy\n12345_00001,completed,2,0.5\n"
                                         "1e234_00002,stopped,1,0.25\n")
    rows = read_trials(tmp_path / "trials.csv")
    assert [(r["trial_id"], r["status"], r["epoch"], r["val_accuracy"]) for r in rows] == [
        ("12345_00001", "completed", 2, 0.5), ("1e234_00002", "stopped", 1, 0.25)]
