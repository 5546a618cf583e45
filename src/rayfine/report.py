"""Reports for people: one self-contained report.html per training run or search, PNGs beside it.

    rayfine report runs/resnet18_digits          # writes train/report.html and/or tune/report.html

    from rayfine.report import write_reports
    paths = write_reports("runs/resnet18_digits")

Everything is read from the run directory (DESIGN.md's contract): config.yaml, train/metrics.jsonl
and eval.json for a training run; tune/trials.csv, summary.json and best/eval.json for a search.
The HTML embeds its images as data URIs, so the single file opens offline and can be mailed.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from rayfine.config.sections import redact_url_passwords
from rayfine.errors import RayfineError
from rayfine.metrics import METRIC_KEYS
from rayfine.rundir import command_config, jsonl_records, read_saved_config, saved_config, write_atomic


def _e(value: Any) -> str:
    """A value read from the run directory's files, as HTML text (a hand-edited file may hold markup)."""
    return html.escape(str(value))


def _save(fig, path: Path, **options) -> Path:
    """The figure as a PNG at ``path``, written whole or not at all (``write_atomic``): the report
    embeds a plot it finds, and a PNG cut short by a kill would stay broken in it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, **options)
    write_atomic(Path(path), buffer.getvalue())
    return Path(path)


def _figure(width: float, height: float):
    """A figure made without pyplot, as matplotlib's "Embedding in a web application server" does:
    no backend is chosen for the process (a notebook's inline backend stays its own) and no figure
    is left registered to close; savefig renders it with Agg."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_confusion_matrix(counts: np.ndarray, labels: list[str], path: str | Path, title: str = "") -> Path:
    n = len(labels)
    size = min(12.0, 2.5 + 0.45 * n)
    fig = _figure(size, size)
    ax = fig.subplots()
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=8,
                            color="white" if shares[i, j] > 0.5 else "black")
        # parse_math=False: labels are the user's text ("$", "$$" price tiers are not mathtext).
        ax.set_xticks(range(n), labels, rotation=90 if max(map(len, labels)) > 3 else 0, parse_math=False)
        ax.set_yticks(range(n), labels, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_learning_curves(runs: dict[str, list[dict]], path: Path, metric: str, highlight: Optional[str] = None,
                         stopped: frozenset = frozenset(), epochs: Optional[int] = None) -> Path:
    """Loss and the validation metric per epoch, one line per run (trial); an x marks where a
    trial was stopped early (by ASHA or halving)."""
    fig = _figure(12, 4.5)
    ax_loss, ax_metric = fig.subplots(1, 2)
    many = len(runs) > 1
    for name, rows in runs.items():
        epochs_seen = [r["epoch"] for r in rows]
        strong = not many or name == highlight
        style = {"linewidth": 2.2 if strong else 1.0, "alpha": 1.0 if strong else 0.55}
        label = f"{name} (best)" if many and name == highlight else (name if many and len(runs) <= 12 else None)
        line, = ax_metric.plot(epochs_seen, [r.get(metric) for r in rows], marker="o", markersize=3, label=label, **style)
        ax_loss.plot(epochs_seen, [r.get("val_loss") for r in rows], color=line.get_color(), **style)
        if not many:
            ax_loss.plot(epochs_seen, [r.get("train_loss") for r in rows], linestyle="--", color=line.get_color(),
                         label="train_loss")
        if name in stopped and rows:
            ax_metric.plot([rows[-1]["epoch"]], [rows[-1].get(metric)], marker="x", markersize=10, color="black")
    ax_loss.set_title("validation loss" + ("" if many else " (dashed: training loss)"))
    ax_metric.set_title(metric + (" per trial; x = stopped early by the scheduler" if many else ""))
    for ax in (ax_loss, ax_metric):
        ax.set_xlabel("epoch")
        if epochs:
            ax.set_xlim(0.8, epochs + 0.2)
        ax.grid(alpha=0.3)
    if ax_metric.get_legend_handles_labels()[0]:
        ax_metric.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_search_overview(trials: dict[str, dict], keys: list[str], metric: str, path: Path,
                         epochs: int, highlight: Optional[str] = None) -> Path:
    """One scatter per sampled hyperparameter: its value against the trial's best metric; the
    colour is how many epochs the trial ran (pale: stopped early)."""
    fig = _figure(4.5 * max(1, len(keys)), 4)
    axes = fig.subplots(1, max(1, len(keys)), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, key in zip(axes[0], keys):
        values = [t["params"].get(key) for t in trials.values()]
        scores = [t["best"] for t in trials.values()]
        ran = [t["epochs"] for t in trials.values()]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = np.asarray(values, dtype=float)
            if xs.min() > 0 and xs.max() / xs.min() >= 8:
                ax.set_xscale("log")
        else:
            categories = sorted({str(v) for v in values})
            xs = np.array([categories.index(str(v)) for v in values], dtype=float) + rng.uniform(-0.15, 0.15, len(values))
            ax.set_xticks(range(len(categories)), categories, parse_math=False)
        points = ax.scatter(xs, scores, c=ran, cmap="viridis", vmin=0, vmax=epochs, s=40, edgecolors="black", linewidths=0.4)
        if highlight in trials:
            i = list(trials).index(highlight)
            ax.scatter([xs[i]], [scores[i]], s=180, facecolors="none", edgecolors="red", linewidths=1.5)
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    fig.colorbar(points, ax=axes[0].tolist(), label="epochs run")
    return _save(fig, path, bbox_inches="tight")


# --- reading the run directory ---------------------------------------------------------------------


def _number(text: str) -> Any:
    if text in ("", None):
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


TEXT_COLUMNS = ("trial_id", "status")  # Tune's ids look like numbers to float() ("12345_00001": underscores)


def read_trials(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [{k: v if k in TEXT_COLUMNS else _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _read_json(path: Path, needs: tuple[str, ...] = ()) -> Optional[dict]:
    """A JSON object of the run directory, None if the file is missing; ``needs``: the keys an
    object that is not empty must hold."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except ValueError as e:  # cut short by an older rayfine killed while writing it, or edited by hand
        raise RayfineError(f"{path} is not valid JSON ({e}): write it again with the command that wrote it, or "
                           "remove it") from None
    missing = [key for key in needs if key not in value] if isinstance(value, dict) and value else []
    if not isinstance(value, dict) or missing:
        what = f"lacks {', '.join(missing)}" if missing else f"holds a JSON {type(value).__name__}, not an object"
        raise RayfineError(f"{path} {what}: it was edited or damaged; write it again with the command that wrote "
                           "it, or remove it")
    return value


EVAL_KEYS = ("per_class", "confusion_matrix", "accuracy", "macro_f1", "loss", "num_samples", "split")


# --- HTML -------------------------------------------------------------------------------------------


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return html.escape("" if value is None else str(value))


def _fmt4(value: Any) -> str:
    """A headline metric; null in the JSON files (not a number: a diverged epoch) shows as nan."""
    return "nan" if value is None else f"{value:.4f}"


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _evaluation_section(evaluation: Optional[dict], matrix_png: Path) -> str:
    if not evaluation:
        return "<section id='evaluation'><h2>Test evaluation</h2><p>No evaluation was written.</p></section>"
    per_class = [{"label": k, **v} for k, v in evaluation["per_class"].items()]
    labels = list(evaluation["per_class"])
    if not matrix_png.is_file():
        plot_confusion_matrix(np.asarray(evaluation["confusion_matrix"]), labels, matrix_png)
    return (
        "<section id='evaluation'><h2>Test evaluation</h2>"
        f"<p class='big'>accuracy <b>{evaluation['accuracy']:.4f}</b> &middot; macro F1 <b>{evaluation['macro_f1']:.4f}</b>"
        f" &middot; loss {_fmt4(evaluation['loss'])} &middot; {_e(evaluation['num_samples'])} examples "
        f"({_e(evaluation['split'])} split)</p>"
        + _img(matrix_png, "confusion matrix")
        + _table(per_class, ["label", "precision", "recall", "f1", "support"])
        + "</section>"
    )


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem} .sub{color:#666;margin-top:0} section{margin:2rem 0}
table{border-collapse:collapse;font-size:.85rem;margin:.8rem 0} td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left} img{max-width:100%;display:block;margin:.5rem 0}
pre{background:#f7f7f7;padding:1rem;overflow-x:auto;font-size:.8rem} .big{font-size:1.15rem}
tr.best td{background:#fff5cc}
"""


def _page(title: str, subtitle: str, sections: list[str]) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p class='sub'>{html.escape(subtitle)}</p>"
            + "".join(sections) + "</body></html>")


def _config_section(config_path: Path) -> str:
    # Without URL passwords (a database tracking_uri's): the report is a file to share.
    text = redact_url_passwords(config_path.read_text()) if config_path.is_file() else "(no config.yaml)"
    return f"<section id='config'><h2>Resolved config</h2><pre>{html.escape(text)}</pre></section>"


def train_report(run_dir: Path) -> Path:
    """<run>/train/report.html from metrics.jsonl, eval.json and the config."""
    train_dir = run_dir / "train"
    # A last line still being appended (or cut short by a kill) is not an epoch yet.
    lines = jsonl_records((train_dir / "metrics.jsonl").read_text(), train_dir / "metrics.jsonl")
    if not lines:
        raise RayfineError(f"{train_dir / 'metrics.jsonl'} has no epochs yet; nothing to report")
    metric = _metric_of(saved_config(run_dir, "train"), "train")
    # The exported checkpoint's epoch; before the export (a run stopped part-way), the best so far
    # by train.metric, ties to the later epoch, as rayfine.train.driver picks it.
    exported = _read_json(train_dir / "checkpoint" / "metrics.json") or {}
    sign = -1 if metric.endswith("loss") else 1
    best = next((m for m in lines if m["epoch"] == exported.get("epoch")), None) or max(
        lines, key=lambda m: (_ranked(m.get(metric), sign), m["epoch"]))
    curves = plot_learning_curves({"run": lines}, train_dir / "learning_curves.png", metric)
    evaluation = _read_json(train_dir / "eval.json", EVAL_KEYS)
    sections = [
        "<section id='best'><h2>Best epoch</h2>"
        f"<p class='big'>epoch {_e(best['epoch'])} of {len(lines)}: {_e(metric)} "
        f"<b>{_fmt4(best.get(metric))}</b></p></section>",
        "<section id='curves'><h2>Learning curves</h2>" + _img(curves, "learning curves")
        + _table(lines, list(METRIC_KEYS)) + "</section>",
        _evaluation_section(evaluation, train_dir / "confusion_matrix.png"),
        _config_section(saved_config(run_dir, "train")),
    ]
    out = train_dir / "report.html"
    write_atomic(out, _page(f"{run_dir.name}: training run", f"{run_dir}", sections))
    return out


def _metric_of(config_path: Path, section: str) -> str:
    """The config's ``train.metric`` (what picks a training run's epoch) or ``tune.metric`` (what
    ranks a search's trials)."""
    return _section_of(config_path, section).get("metric") or "val_accuracy"


def _section_of(config_path: Path, section: str) -> dict:
    value = read_saved_config(config_path).get(section) if config_path.is_file() else None
    return value if isinstance(value, dict) else {}


def _is_number(value: Any) -> bool:
    """A metric value that can rank: a number, not a bool, not NaN (a diverged epoch)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _ranked(value: Any, sign: int) -> float:
    """``value`` made larger-is-better by ``sign``; a NaN or missing value ranks below every number."""
    return sign * float(value) if _is_number(value) else -math.inf


def _best_value(values: list[Any], sign: int) -> float:
    """A trial's best epoch value (``sign`` -1 when lower is better); a NaN is no best, NaN only
    when the trial has nothing else."""
    kept = [v for v in values if _is_number(v)]
    return max(kept, key=lambda v: _ranked(v, sign)) if kept else math.nan


def tune_report(run_dir: Path) -> Path:
    """<run>/tune/report.html from trials.csv, summary.json and the winner's evaluation."""
    tune_dir = run_dir / "tune"
    rows = read_trials(tune_dir / "trials.csv") if (tune_dir / "trials.csv").is_file() else trials_so_far(run_dir)
    summary = _read_json(tune_dir / "summary.json") or {}
    if not isinstance(summary.get("best") or {}, dict):
        raise RayfineError(f"{tune_dir / 'summary.json'}: best is not an object; it was edited or damaged: write it "
                           "again with `rayfine tune --resume`, or remove it")
    metric = summary.get("metric") or _metric_of(saved_config(run_dir, "tune"), "tune")
    # summary.json's mode, else the config's tune.mode, else tune.metric_mode's default.
    mode = summary.get("mode") or _section_of(saved_config(run_dir, "tune"), "tune").get("mode") or (
        "min" if metric.endswith("loss") else "max")
    sign = -1 if mode == "min" else 1
    fixed = set(METRIC_KEYS) | {"trial_id", "status", "checkpoint_path"}
    keys = [k for k in (rows[0] if rows else {}) if k not in fixed]
    by_trial: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("epoch") is not None:
            by_trial.setdefault(str(r["trial_id"]), []).append(r)
    if summary:
        epochs = summary.get("epochs_per_trial") or max(  # summaries before 2026-12-07 lack it
            summary.get("epochs_full_budget", 0) // max(1, summary.get("num_trials", 1)), 1)
    else:  # the search has not ended (or stopped before its winner was evaluated): the trials' budget
        epochs = max([_section_of(saved_config(run_dir, "tune"), "train").get("epochs") or 1]
                     + [r["epoch"] for r in rows if isinstance(r.get("epoch"), (int, float))])
    trials = {
        tid: {
            "params": {k: trial_rows[0].get(k) for k in keys},
            "best": _best_value([r.get(metric) for r in trial_rows], sign),
            "epochs": max(r["epoch"] for r in trial_rows),
            "status": trial_rows[-1].get("status"),
        }
        for tid, trial_rows in by_trial.items()
    }
    winner = str((summary.get("best") or {}).get("trial_id")) if summary.get("best") else None
    stopped = frozenset(t for t, info in trials.items() if info["status"] == "stopped")
    if trials:
        curves = _img(plot_learning_curves(by_trial, tune_dir / "learning_curves.png", metric, highlight=winner,
                                           stopped=stopped, epochs=epochs), "learning curves per trial")
        overview = _img(plot_search_overview(trials, keys, metric, tune_dir / "search_overview.png", epochs,
                                             highlight=winner), "search overview")
    else:  # every trial failed before its first epoch: nothing to plot
        curves = overview = "<p>No trial finished an epoch.</p>"
    leaderboard = sorted(
        ({"trial_id": t, **info["params"], f"best {metric}": info["best"], "epochs run": info["epochs"], "status": info["status"]}
         for t, info in trials.items()),
        key=lambda r: (math.isnan(r[f"best {metric}"]), -sign * r[f"best {metric}"]),
    )
    best = summary.get("best") or {}
    budget = (f"{_e(summary.get('epochs_run'))} of {_e(summary.get('epochs_full_budget'))} epochs "
              f"({summary.get('budget_fraction', 0):.2f} of the full budget) in {summary.get('wall_s', 0):.0f} s")
    sections = [
        "<section id='winner'><h2>Winner</h2>"
        + (f"<p class='big'>trial <b>{_e(best.get('trial_id'))}</b> at epoch {_e(best.get('epoch'))}: "
           f"{_e(metric)} <b>{_fmt(best.get(metric))}</b>; "
           + ", ".join(f"{html.escape(k)} = {_fmt(v)}" for k, v in (best.get("overrides") or {}).items()) + "</p>"
           if best else "<p>No winner: no trial produced a usable checkpoint.</p>" if summary else
           "<p>No winner yet: tune/summary.json is missing, so the search has not ended, or stopped before its "
           "winner was evaluated (`--resume` finishes it). What its trials reported so far is below.</p>")
        + (f"<p>{_e(summary.get('num_trials', len(trials)))} trials, scheduler {_e(summary.get('scheduler'))}, "
           f"searcher {_e(summary.get('searcher'))}; {budget}.</p></section>" if summary else
           f"<p>{len(trials)} trials with results.</p></section>"),
        "<section id='curves'><h2>Learning curves</h2>" + curves + "</section>",
        "<section id='search'><h2>Hyperparameters against the metric</h2>" + overview
        + _table(leaderboard, list(leaderboard[0]) if leaderboard else []) + "</section>",
        _evaluation_section(_read_json(tune_dir / "best" / "eval.json", EVAL_KEYS),
                            tune_dir / "best" / "confusion_matrix.png"),
        _config_section(saved_config(run_dir, "tune")),
    ]
    out = tune_dir / "report.html"
    write_atomic(out, _page(f"{run_dir.name}: hyperparameter search", f"{run_dir}", sections))
    return out


def trials_so_far(run_dir: Path) -> list[dict]:
    """The rows of tune/trials.csv for a search that has not written it: running, or ended by a
    signal (the search writes it when Tune's loop returns). Each trial's params from the params.json
    Tune wrote when it started, its epochs from its epoch log; "completed" once it reported every
    epoch, else "unfinished" (running, stopped by the scheduler, or interrupted)."""
    import pyarrow.fs

    from rayfine.config import validate
    from rayfine.config.sections import storage_location
    from rayfine.tune.search import EXPERIMENT_NAME, trial_base
    from rayfine.tune.trial import epoch_log_path, epoch_rows, read_epoch_log

    cfg = validate(read_saved_config(saved_config(run_dir, "tune")))
    keys, epochs = list(cfg.tune.search_space), trial_base(cfg).train.epochs
    # From where the run directory is now (its config may name runs_dir relative to another directory).
    storage = storage_location(cfg.storage.storage_path, run_dir, run_dir.name)
    fs, experiment = (pyarrow.fs.FileSystem.from_uri(f"{storage}/{EXPERIMENT_NAME}") if "://" in storage
                      else (pyarrow.fs.LocalFileSystem(), f"{storage}/{EXPERIMENT_NAME}"))
    rows = []
    entries = fs.get_file_info(pyarrow.fs.FileSelector(experiment, allow_not_found=True))
    for entry in sorted((e for e in entries if e.type == pyarrow.fs.FileType.Directory), key=lambda e: e.base_name):
        try:
            with fs.open_input_stream(f"{entry.path}/params.json") as f:
                params = json.loads(f.read())
        except (FileNotFoundError, ValueError):  # not a trial's folder, or one Tune is still writing
            continue
        records = list(read_epoch_log(epoch_log_path(f"{storage}/trials", entry.base_name)))
        last_epoch = max((int(r["epoch"]) for r in records), default=None)
        status = "not started" if last_epoch is None else "completed" if last_epoch == epochs else "unfinished"
        rows += epoch_rows(entry.base_name, params, keys, records, status)
    return rows


def write_reports(path: str | Path) -> list[Path]:
    """Reports for a run directory (<runs>/<name>), or its train/ or tune/ folder."""
    path = Path(path).expanduser().resolve()
    if path.name in ("train", "tune") and (path.parent / "config.yaml").is_file():
        path = path.parent
    written = []
    if (path / "train" / "metrics.jsonl").is_file():
        written.append(train_report(path))
    if (path / "tune" / "trials.csv").is_file() or command_config(path, "tune").is_file():
        written.append(tune_report(path))
    if not written:
        raise RayfineError(f"{path}: no training run (train/metrics.jsonl) or search (tune/config.yaml) to report on")
    return written
