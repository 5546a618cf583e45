"""Confusion-matrix metrics agree with scikit-learn (unit tier)."""

from pathlib import Path

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
    counted = np.zeros((4, 4), np.int64)  # what each validation batch adds, in place
    for start in range(0, len(y_true), 16):
        metrics.add_confusion(counted, y_true[start:start + 16], y_pred[start:start + 16])
    assert (counted == whole).all()
    assert np.array_equal(whole, parts)


def test_label_names_are_plotted_as_text_not_mathtext(tmp_path):
    """Price tiers "$" .. "$$$$" are labels, not matplotlib mathtext (which raised on them)."""
    from rayfine.report import plot_confusion_matrix

    labels = ["$", "$$", "$$$", "$$$$"]
    path = plot_confusion_matrix(np.eye(4, dtype=np.int64) * 3, labels, tmp_path / "cm.png")
    assert path.stat().st_size > 0


def test_plots_leave_the_processs_matplotlib_backend_alone(tmp_path):
    """report.py chose the Agg backend for the whole process (matplotlib.use), which turned a
    notebook's inline plots off after any training run, search or report."""
    import matplotlib

    from rayfine.report import plot_confusion_matrix, plot_learning_curves, plot_search_overview

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # standing in for a notebook's own backend
    try:
        plot_confusion_matrix(np.eye(2, dtype=np.int64), ["a", "b"], tmp_path / "cm.png")
        rows = [{"epoch": 1, "val_loss": 0.5, "train_loss": 0.6, "val_accuracy": 0.7}]
        plot_learning_curves({"t1": rows, "t2": rows}, tmp_path / "curves.png", "val_accuracy", stopped=frozenset({"t2"}))
        plot_search_overview({"t1": {"params": {"train.lr": 0.1}, "best": 0.7, "epochs": 1}}, ["train.lr"],
                             "val_accuracy", tmp_path / "overview.png", epochs=2)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    for name in ("cm.png", "curves.png", "overview.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_trial_ids_read_back_as_written(tmp_path):
    """Tune's ids are 5 hex digits and a counter; float() reads "12345_00001" as a number."""
    from rayfine.report import read_trials

    (tmp_path / "trials.csv").write_text("trial_id,status,epoch,val_accuracy\n12345_00001,completed,2,0.5\n"
                                         "1e234_00002,stopped,1,0.25\n")
    rows = read_trials(tmp_path / "trials.csv")
    assert [(r["trial_id"], r["status"], r["epoch"], r["val_accuracy"]) for r in rows] == [
        ("12345_00001", "completed", 2, 0.5), ("1e234_00002", "stopped", 1, 0.25)]


def test_a_training_reports_best_epoch_is_the_exported_checkpoints(tmp_path):
    """train.metric picks a training run's checkpoint (tune.metric is a search's business), and
    before the export the best so far breaks ties towards the later epoch, as the driver does."""
    import json

    from rayfine.config import load_config
    from rayfine.report import train_report

    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    (run / "config.yaml").write_text(load_config("resnet18_digits_tiny", ["train.metric=val_loss"]).to_yaml())
    epochs = [{"epoch": e, "train_loss": 1.0, "val_loss": loss, "val_accuracy": acc, "val_macro_f1": acc,
               "samples_per_s": 10.0, "epoch_s": 1.0} for e, loss, acc in ((1, 0.30, 0.90), (2, 0.20, 0.80), (3, 0.20, 0.70))]
    (run / "train" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in epochs))
    assert "epoch 3 of 3: val_loss <b>0.2000</b>" in train_report(run).read_text()  # not val_accuracy's epoch 1
    (run / "train" / "checkpoint").mkdir()
    (run / "train" / "checkpoint" / "metrics.json").write_text(json.dumps(epochs[1]))
    assert "epoch 2 of 3: val_loss <b>0.2000</b>" in train_report(run).read_text()


def test_reports_rank_a_nan_epoch_last_and_read_the_searchs_mode_and_survive_a_search_without_epochs(tmp_path):
    """A diverged (NaN) first epoch is never a training run's best; a search report without
    summary.json (its export failed) ranks train_loss lowest-first as tune.metric_mode does; a
    search whose trials all failed before an epoch still gets its report."""
    import json

    from rayfine.config import load_config
    from rayfine.report import train_report, tune_report

    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    (run / "config.yaml").write_text(load_config("resnet18_digits_tiny", ["train.metric=val_loss"]).to_yaml())
    epochs = [{"epoch": e, "train_loss": 1.0, "val_loss": loss, "val_accuracy": 0.5, "val_macro_f1": 0.5,
               "samples_per_s": 10.0, "epoch_s": 1.0} for e, loss in ((1, float("nan")), (2, 0.4), (3, 0.3))]
    (run / "train" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in epochs))
    assert "epoch 3 of 3: val_loss <b>0.3000</b>" in train_report(run).read_text()

    search = tmp_path / "search"
    (search / "tune").mkdir(parents=True)
    (search / "config.yaml").write_text(load_config("resnet18_digits_tiny", ["tune.metric=train_loss"]).to_yaml())
    (search / "tune" / "trials.csv").write_text(
        "trial_id,status,train.lr,epoch,train_loss,val_accuracy\n"
        "a_00000,completed,0.001,1,0.9,0.5\na_00000,completed,0.001,2,0.2,0.6\n"
        "a_00001,completed,0.01,1,0.8,0.5\na_00001,completed,0.01,2,0.5,0.9\n")
    page = tune_report(search).read_text()
    board = page[page.index("id='search'"):]
    assert board.index("a_00000") < board.index("a_00001")  # train_loss 0.2 beats 0.5

    (search / "tune" / "trials.csv").write_text("trial_id,status,train.lr,epoch,train_loss,val_accuracy\n"
                                                "a_00000,error,0.001,,,\n")
    (search / "tune" / "summary.json").write_text(json.dumps({"metric": "val_accuracy", "mode": "max", "num_trials": 1}))
    page = tune_report(search).read_text()
    assert "No trial finished an epoch." in page and "No winner" in page


def test_the_classification_reports_macro_average_is_eval_jsons(tmp_path):
    """A class the test split lacks and the model never predicts is left out of both averages
    (scikit-learn's f1_score default), and named under the report."""
    from rayfine.evaluate import classification_report_text, evaluation_report

    labels = ["ant", "bee", "cat", "dog"]
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0, 2])
    probs = np.eye(4, dtype=np.float32)[y_pred] * 0.9 + 0.025
    report = evaluation_report(y_true, probs, labels, "test")
    text = classification_report_text(y_true, y_pred, labels, "test")
    macro = next(line for line in text.splitlines() if line.strip().startswith("macro avg")).split()
    assert float(macro[4]) == pytest.approx(report["macro_f1"], abs=5e-5)
    assert report["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert "dog" not in text.split("not in the test split")[0]
    assert text.rstrip().endswith("not in the test split and never predicted (left out of the averages): dog")
    # A class that is predicted but not in the split stays in the table (its precision is 0).
    assert " dog " in classification_report_text(y_true, np.where(y_pred == 2, 3, y_pred), labels, "test")


def test_reports_of_a_search_without_its_summary_and_of_files_cut_short(tmp_path, monkeypatch):
    """A search that has not written tune/summary.json yet (still running, or stopped before its
    winner was evaluated) plots its trials over the config's train.epochs and says why there is
    no winner; a metrics.jsonl line still being appended is not an epoch; a JSON file cut short is
    named, not a bare JSONDecodeError."""
    import json

    from rayfine import report
    from rayfine.config import load_config
    from rayfine.errors import RayfineError

    search = tmp_path / "search"
    (search / "tune").mkdir(parents=True)
    (search / "config.yaml").write_text(load_config("resnet18_digits_tiny", ["train.epochs=4"]).to_yaml())
    (search / "tune" / "trials.csv").write_text(
        "trial_id,status,train.lr,epoch,train_loss,val_accuracy\n"
        "a_00000,running,0.001,1,0.9,0.5\na_00000,running,0.001,2,0.2,0.6\na_00001,stopped,0.01,1,0.8,0.4\n")
    plotted = {}
    monkeypatch.setattr(report, "plot_learning_curves", lambda *a, epochs, **k: plotted.setdefault("curves", epochs)
                        and tmp_path / "none.png")
    monkeypatch.setattr(report, "plot_search_overview", lambda *a, **k: plotted.setdefault("overview", a[4])
                        and tmp_path / "none.png")
    monkeypatch.setattr(report, "_img", lambda path, alt: f"<img alt='{alt}'>")
    page = report.tune_report(search).read_text()
    assert plotted == {"curves": 4, "overview": 4}  # was 1: every epoch after the first off the plot
    assert "No winner yet: tune/summary.json is missing" in page and "2 trials with results" in page
    assert "None" not in page[page.index("id='winner'"):page.index("id='curves'")]
    monkeypatch.undo()

    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    (run / "config.yaml").write_text(load_config("resnet18_digits_tiny").to_yaml())
    epoch = {"epoch": 1, "train_loss": 1.0, "val_loss": 0.5, "val_accuracy": 0.5, "val_macro_f1": 0.5,
             "samples_per_s": 10.0, "epoch_s": 1.0}
    (run / "train" / "metrics.jsonl").write_text(json.dumps(epoch) + "\n" + '{"epoch": 2, "train_lo')
    assert "epoch 1 of 1: val_accuracy" in report.train_report(run).read_text()
    (run / "train" / "eval.json").write_text('{"accuracy": 0.9, "macro')
    with pytest.raises(RayfineError, match=rf"{run / 'train' / 'eval.json'} is not valid JSON \(.*\): write it "
                                           "again with the command that wrote it, or remove it"):
        report.train_report(run)


def test_run_directory_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A process killed mid-write leaves the previous file (or none), never a truncated one."""
    import os

    from rayfine.rundir import write_atomic

    path = tmp_path / "sub" / "summary.json"
    write_atomic(path, "old")

    def killed(fd):
        raise KeyboardInterrupt  # the kill arrives between the write and the rename

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new, longer text")
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]
    monkeypatch.undo()
    old_umask = os.umask(0o022)
    try:
        write_atomic(path, "new")
    finally:
        os.umask(old_umask)
    assert path.read_text() == "new"
    assert path.stat().st_mode & 0o777 == 0o644  # as write_text would make it, not a temporary file's 0600


def test_eval_jsons_loss_is_the_cross_entropy_also_of_confident_mistakes():
    """eval.json's loss is val_loss's definition, F.cross_entropy: from log-probabilities, exact where
    a probability underflows (it was clipped at 1e-12: at most 27.6 an example)."""
    import torch
    import torch.nn.functional as F

    from rayfine.evaluate import evaluation_report

    logits, y = torch.tensor([[0.0, 40.0], [0.0, 120.0], [3.0, 1.0]]), torch.tensor([0, 0, 0])
    report = evaluation_report(y.numpy(), torch.log_softmax(logits, -1).numpy(), ["a", "b"], "test", log_probs=True)
    assert report["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)  # 53.38
    assert report["accuracy"] == pytest.approx(1 / 3)
    from_probs = evaluation_report(y.numpy(), torch.softmax(logits, -1).numpy(), ["a", "b"], "test")
    assert from_probs["accuracy"] == report["accuracy"] and from_probs["loss"] < 20  # the clipped figure


def test_a_checkpoints_log_probabilities_are_its_probabilities_logarithms_computed_without_grad():
    import torch

    from rayfine.checkpoints import LoadedCheckpoint
    from rayfine.config import load_config
    from rayfine.models import build_model

    cfg = load_config("resnet18_digits_tiny")
    ckpt = LoadedCheckpoint(Path("."), cfg, ["a", "b", "c"], {}, build_model(cfg, ["a", "b", "c"]).eval())
    inputs = {"pixel_values": torch.randn(4, 1, 8, 8)}
    log_probs = ckpt.predict_log_proba(inputs)
    assert not log_probs.requires_grad  # .numpy() works, as evaluation calls it
    assert torch.allclose(log_probs.exp(), ckpt.predict_proba(inputs), atol=1e-6)


def test_run_files_edited_or_damaged_are_named(tmp_path):
    """Hand-edited run files gave tracebacks that named no file: eval.json without per_class was
    `KeyError: 'per_class'`, a config.yaml that is a list `AttributeError: 'list' object has no
    attribute 'get'`, a metrics.jsonl line that is a list `TypeError: list indices must be integers`,
    an empty train/config.yaml a continuation refused as a different config "(changed: )"."""
    import json

    from rayfine.config import load_config
    from rayfine.errors import RayfineError
    from rayfine.report import train_report, tune_report
    from rayfine.train.driver import RESUMABLE_CHANGES, changes_since

    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    cfg = load_config("resnet18_digits_tiny")
    (run / "config.yaml").write_text(cfg.to_yaml())
    epoch = {"epoch": 1, "train_loss": 1.0, "val_loss": 0.3, "val_accuracy": 0.9, "val_macro_f1": 0.9,
             "samples_per_s": 10.0, "epoch_s": 1.0}
    (run / "train" / "metrics.jsonl").write_text(json.dumps(epoch) + "\n")
    (run / "train" / "eval.json").write_text('{"accuracy": 0.9}')
    with pytest.raises(RayfineError, match=r"train/eval.json lacks per_class, confusion_matrix, .*: it was edited or "
                                           "damaged"):
        train_report(run)
    (run / "train" / "eval.json").write_text("[]")
    with pytest.raises(RayfineError, match=r"eval.json holds a JSON list, not an object"):
        train_report(run)
    (run / "train" / "eval.json").write_text("{}")  # empty: no evaluation, as before
    assert "No evaluation was written" in train_report(run).read_text()
    (run / "train" / "metrics.jsonl").write_text(json.dumps(epoch) + "\n[1]\n")
    with pytest.raises(RayfineError, match=r"metrics.jsonl: line 2 is not an epoch's record"):
        train_report(run)
    (run / "train" / "metrics.jsonl").write_text(json.dumps(epoch) + "\n")
    (run / "config.yaml").write_text("- name\n")
    with pytest.raises(RayfineError, match=rf"{run / 'config.yaml'} is not a rayfine config; it was edited or damaged"):
        train_report(run)
    (run / "config.yaml").write_text("train: [\n")
    with pytest.raises(RayfineError, match=r"config.yaml is not YAML \(.*\); it was edited or damaged"):
        train_report(run)
    (run / "config.yaml").write_text("")
    with pytest.raises(RayfineError, match=r"config.yaml is not a rayfine config"):
        changes_since(run / "config.yaml", cfg, RESUMABLE_CHANGES)

    (run / "tune").mkdir()
    (run / "tune" / "trials.csv").write_text("trial_id,epoch,val_accuracy,status\nt1,1,0.5,completed\n")
    (run / "tune" / "summary.json").write_text('{"best": "t1"}')
    with pytest.raises(RayfineError, match=r"summary.json: best is not an object"):
        tune_report(run)


def test_a_search_that_has_not_written_trials_csv_is_reported_from_its_trials_logs(tmp_path):
    """The README says `rayfine report` reports a running search, or one stopped before its winner
    was evaluated, with what its trials reported; but trials.csv is written when Tune's loop returns,
    so a running search, or one ended by Ctrl-C or SIGTERM, had "no ... search to report on"."""
    import json

    from rayfine.config import load_config
    from rayfine.report import write_reports

    from rayfine.tune.search import trial_base

    cfg = load_config("resnet18_digits_tiny", ["name=s", f"storage.runs_dir={tmp_path}"])
    full = trial_base(cfg).train.epochs  # a trial's epochs: tune.trial_overrides may set them
    run = cfg.run_dir()
    (run / "tune").mkdir(parents=True)
    (run / "tune" / "config.yaml").write_text(cfg.to_yaml())
    epoch = {"train_loss": 1.0, "val_loss": 0.5, "val_accuracy": 0.8, "val_macro_f1": 0.8, "samples_per_s": 9.0,
             "epoch_s": 1.0}
    for trial_id, lr, epochs in (("a1_00000", 0.001, full), ("a1_00001", 0.01, 1)):
        (run / "ray" / "tune" / trial_id).mkdir(parents=True)
        (run / "ray" / "tune" / trial_id / "params.json").write_text(json.dumps({"train.lr": lr}))
        log = run / "ray" / "trials" / f"trial_{trial_id}" / "epochs.jsonl"
        log.parent.mkdir(parents=True)
        log.write_text("".join(json.dumps({**epoch, "epoch": e}) + "\n" for e in range(1, epochs + 1)))
    (report,) = write_reports(run)
    page = report.read_text()
    assert "No winner yet" in page and "2 trials with results" in page
    assert f"<td>a1_00000</td><td>0.001</td><td>0.8</td><td>{full}</td><td>completed</td>" in page
    assert "<td>a1_00001</td><td>0.01</td><td>0.8</td><td>1</td><td>unfinished</td>" in page


def test_values_read_from_a_searchs_files_are_escaped_in_its_report(tmp_path):
    """summary.json is the run directory's, which anyone who can write there may edit."""
    import json

    from rayfine.config import load_config
    from rayfine.report import tune_report

    search = tmp_path / "search"
    (search / "tune").mkdir(parents=True)
    (search / "config.yaml").write_text(load_config("resnet18_digits_tiny").to_yaml())
    (search / "tune" / "trials.csv").write_text("trial_id,status,train.lr,epoch,val_loss,val_accuracy\n"
                                                "a_00000,completed,0.001,1,0.9,0.5\n")
    (search / "tune" / "summary.json").write_text(json.dumps({
        "metric": "val_accuracy", "mode": "max", "num_trials": 1, "epochs_run": "<script>x()</script>",
        "epochs_full_budget": 3, "best": {"trial_id": "a_00000", "epoch": "<b>1</b>", "val_accuracy": 0.5}}))
    page = tune_report(search).read_text()
    assert "<script>x()" not in page and "<b>1</b>" not in page
    assert "&lt;script&gt;x()&lt;/script&gt; of 3 epochs" in page and "at epoch &lt;b&gt;1&lt;/b&gt;" in page


def test_a_plot_cut_short_leaves_no_broken_png(tmp_path, monkeypatch):
    """The report embeds a plot it finds, and never draws it again: a PNG cut short by a kill
    stayed broken in it. A plot is now written whole or not at all."""
    import numpy as np
    from matplotlib.figure import Figure

    from rayfine.report import plot_confusion_matrix

    def cut_short(self, target, **kwargs):
        if isinstance(target, (str, Path)):
            Path(target).write_bytes(b"\x89PNG\r\n")
        else:
            target.write(b"\x89PNG\r\n")
        raise KeyboardInterrupt

    path = tmp_path / "confusion_matrix.png"
    monkeypatch.setattr(Figure, "savefig", cut_short)
    with pytest.raises(KeyboardInterrupt):
        plot_confusion_matrix(np.eye(2, dtype=int), ["a", "b"], path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    plot_confusion_matrix(np.eye(2, dtype=int), ["a", "b"], path)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and [p.name for p in tmp_path.iterdir()] == [path.name]
