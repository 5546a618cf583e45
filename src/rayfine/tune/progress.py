"""What `rayfine tune` shows while it runs: a live table of trials (redrawn in place on a
terminal, one plain line per event otherwise) and the leaderboard at the end.

Runs on the driver as a Ray Tune ``Callback``; Tune's own console reporter is turned off.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Optional

from ray.tune import Callback

from rayfine.progress import interactive

SHOWN_METRICS = ("val_accuracy", "val_loss")


def trial_status(status: str, last_epoch: Optional[int], epochs: int) -> str:
    """Tune's trial status in words: an ended trial either completed its epochs or was stopped."""
    if status == "TERMINATED":
        return "completed" if last_epoch == epochs else "stopped"
    return {"ERROR": "error", "RUNNING": "running", "PENDING": "pending", "PAUSED": "paused"}.get(status, status.lower())


def rank_key(value: float, epoch: Any, trial_id: Any, mode: str) -> tuple:
    """How a search ranks an epoch of a trial, the best first: by the metric, ties to the earlier
    epoch, then the lower trial id (the winner, ``search.pick_best``, and the leaderboard)."""
    return (-value if mode == "max" else value, epoch if epoch is not None else math.inf, str(trial_id))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


class Board:
    """The trials' table: one row per trial, from Tune's Trial objects."""

    def __init__(self, keys: list[str], metric: str, mode: str, epochs: int,
                 history: Optional[Callable[[str], Iterable[dict]]] = None):
        self.keys, self.metric, self.mode, self.epochs = keys, metric, mode, epochs
        # Trial id -> the epochs it reported (its epoch log). Tune can restore a trial without the
        # results it had, when the driver was killed before Tune saved them; and a trial stopped
        # (tune.time_budget_s) before its last result reached the driver has it only there.
        self.history = history
        self.rows: dict[str, dict[str, Any]] = {}

    def _new_row(self, trial_id: str) -> dict[str, Any]:
        return self.catch_up({"best": None, "best_epoch": None}, trial_id)

    def catch_up(self, row: dict[str, Any], trial_id: str) -> dict[str, Any]:
        """``row`` with the epochs of the trial's log that it does not show yet."""
        for record in self.history(trial_id) if self.history else ():
            if record.get("epoch") is not None and record["epoch"] > (row.get("epoch") or 0):
                row.update({"epoch": record["epoch"], **{m: record.get(m) for m in SHOWN_METRICS}})
            self._keep_best(row, trial_id, record.get(self.metric), record.get("epoch"))
        return row

    def _keep_best(self, row: dict[str, Any], trial_id: str, value: Optional[float], epoch: Any) -> None:
        """The trial's best epoch as the winner is picked: a NaN (a diverged epoch) is none, equal
        values keep the earlier epoch."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        if row["best"] is None or (rank_key(value, epoch, trial_id, self.mode)
                                   < rank_key(row["best"], row["best_epoch"], trial_id, self.mode)):
            row["best"], row["best_epoch"] = value, epoch

    def update(self, trial) -> bool:
        """Refresh one trial's row; True when something shown changed."""
        if trial.trial_id not in self.rows:
            self.rows[trial.trial_id] = self._new_row(trial.trial_id)
        row = self.rows[trial.trial_id]
        last = trial.last_result or {}
        # A resumed search: Tune's last result may be missing, or older than the epoch log.
        shown = last if last.get("epoch") is not None and last["epoch"] >= (row.get("epoch") or 0) else row
        self._keep_best(row, trial.trial_id, last.get(self.metric), last.get("epoch"))
        new = {
            "trial": trial.trial_id,
            **{k: trial.config.get(k) for k in self.keys},
            "status": trial_status(trial.status, shown.get("epoch"), self.epochs),
            "epoch": shown.get("epoch"),
            **{m: shown.get(m) for m in SHOWN_METRICS},
        }
        changed = any(row.get(k) != v for k, v in new.items())
        row.update(new)
        return changed

    def table(self, rows: Optional[list[dict]] = None, rank: bool = False) -> str:
        rows = list(self.rows.values()) if rows is None else rows
        cols = (["#"] if rank else []) + ["trial", *self.keys, "status", "epoch", *SHOWN_METRICS, f"best {self.metric}"]
        body = []
        for i, r in enumerate(rows, 1):
            epoch = f"{r['epoch']}/{self.epochs}" if r.get("epoch") is not None else "-"
            cells = [r["trial"], *[_fmt(r.get(k)) for k in self.keys], r["status"], epoch,
                     *[_fmt(r.get(m)) for m in SHOWN_METRICS], _fmt(r["best"])]
            body.append(([str(i)] if rank else []) + cells)
        widths = [max(len(c), *(len(line[j]) for line in body)) if body else len(c) for j, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in body]
        return "\n".join(lines)

    def leaderboard(self) -> str:
        # Ranked as the winner is picked (search.pick_best): ties to the earlier best epoch, then
        # the lower trial id (the same order after a resume); trials without a result last.
        ranked = sorted(self.rows.items(), key=lambda kv: (
            kv[1]["best"] is None, rank_key(kv[1]["best"] or 0.0, kv[1]["best_epoch"], kv[0], self.mode)))
        return self.table([row for _, row in ranked], rank=True)


class SearchProgress(Callback):
    """Tune callback: the live table on a terminal, plain event lines when not a TTY."""

    def __init__(self, keys: list[str], metric: str, mode: str, epochs: int, log: Callable[[str], None] = print,
                 refresh_s: float = 1.0, history: Optional[Callable[[str], Iterable[dict]]] = None):
        self.keys, self.metric, self.mode, self.epochs = keys, metric, mode, epochs
        self.log, self.refresh_s, self.history = log, refresh_s, history
        self._watch: Optional[_WriteWatch] = None
        self._reset()

    def _reset(self) -> None:
        self.board = Board(self.keys, self.metric, self.mode, self.epochs, self.history)
        self._drawn_lines, self._drawn_at, self._dirty = 0, 0.0, False

    def __reduce__(self):
        # Tune pickles its callbacks with the experiment (tuner.pkl) and a resumed search gets
        # them back from there: let that be the resuming driver's own SearchProgress.
        return (_active_progress, ())

    @property
    def live(self) -> bool:
        return interactive(self.log)

    def _after(self, epoch: Optional[int]) -> str:
        return f" after epoch {epoch}/{self.epochs}" if epoch is not None else ""

    def _values(self, trial) -> str:
        return ", ".join(f"{k}={_fmt(trial.config.get(k))}" for k in self.keys)

    def setup(self, **info) -> None:
        self._reset()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.board.update(trial)
        if not self.live:
            # A paused trial (tune.scheduler: halving) starts again after its last epoch.
            epoch = self.board.rows[trial.trial_id]["epoch"]
            how = f"resumed{self._after(epoch)}" if epoch else "started"
            self.log(f"[tune] {trial.trial_id} {how} ({self._values(trial)})")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.board.update(trial)
        if not self.live and "epoch" in result:
            shown = "  ".join(f"{m} {result[m]:.4f}" for m in SHOWN_METRICS if m in result)
            self.log(f"[tune] {trial.trial_id} epoch {result['epoch']}/{self.epochs}  {shown}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.board.update(trial)
        row = self.board.rows[trial.trial_id]
        if not self.live:
            # Tune marks the trial TERMINATED only after this call: tell by its epochs.
            how = "completed" if row["epoch"] == self.epochs else f"stopped early{self._after(row['epoch'])}"
            self.log(f"[tune] {trial.trial_id} {how}; best {self.metric} {_fmt(row['best'])}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.board.update(trial)
        if not self.live:
            lines = [line for line in str(trial.get_error() or "").splitlines() if line.strip()]
            why = f": {lines[-1].strip()}" if lines else ""
            self.log(f"[tune] {trial.trial_id} failed{why} (details: {trial.error_file or trial.path})")

    def on_step_end(self, iteration, trials, **info) -> None:
        # Also picks up trials a resumed search restored as already finished.
        for trial in trials:
            was = self.board.rows.get(trial.trial_id, {}).get("status")
            self._dirty |= self.board.update(trial)
            row = self.board.rows[trial.trial_id]
            if not self.live and row["status"] == "paused" and was != "paused":
                self.log(f"[tune] {trial.trial_id} paused{self._after(row['epoch'])}; "
                         "waits for the other trials to reach it")
        if self.live and self._dirty and time.monotonic() - self._drawn_at >= self.refresh_s:
            self._draw()

    def on_experiment_end(self, trials, **info) -> None:
        for trial in trials:
            self.board.update(trial)
            if self.history is not None:  # what Tune had not heard of yet, in the final table
                self.board.catch_up(self.board.rows[trial.trial_id], trial.trial_id)
                self.board.update(trial)
        if self.live:
            self._draw()

    @contextlib.contextmanager
    def active(self) -> Iterator["SearchProgress"]:
        """While the search is created (or restored) and runs: this is the search's progress
        callback, and on a terminal other writers are noticed (Ray forwards its workers' logs to
        this console), so the table is redrawn in place only when nothing was printed below it."""
        global _ACTIVE
        _ACTIVE = self
        out, err = sys.stdout, sys.stderr
        if self.live:
            self._watch = _WriteWatch(out)
            sys.stdout, sys.stderr = self._watch, _WriteWatch(err, self._watch)
        try:
            yield self
        finally:
            sys.stdout, sys.stderr = out, err
            self._watch, _ACTIVE = None, None

    def _draw(self) -> None:
        text, rows = fit_screen(self.board.table(), shutil.get_terminal_size())
        stream = self._watch.stream if self._watch else sys.stdout
        in_place = self._drawn_lines and not (self._watch and self._watch.foreign)
        # Move up over the previous table and clear to the end of the screen, then redraw.
        stream.write((f"\x1b[{self._drawn_lines}F\x1b[J" if in_place else "") + text + "\n")
        stream.flush()
        if self._watch:
            self._watch.foreign = False
        self._drawn_lines, self._drawn_at, self._dirty = rows, time.monotonic(), False


def fit_screen(text: str, size: os.terminal_size) -> tuple[str, int]:
    """The live table as the terminal shows it, and the screen rows it takes. A line wider than the
    terminal wraps onto more rows, which the redraw must move up over (an 80-column terminal
    showed stale copies of a 98-column table); the cursor cannot move above the top of the screen,
    so a table taller than it is cut to its first lines, with a line saying how many are left out."""
    columns, height = max(1, size.columns), max(3, size.lines)
    kept, rows = [], 0
    lines = text.split("\n")
    for i, line in enumerate(lines):
        need = max(1, math.ceil(len(line) / columns))
        if rows + need > height - 2:  # a row for the "left out" line, one for the cursor below
            kept.append(f"... {len(lines) - i} more line(s) (a larger terminal shows them)"[:columns])
            rows += 1
            break
        kept.append(line)
        rows += need
    return "\n".join(kept), rows


_ACTIVE: Optional[SearchProgress] = None


def _active_progress() -> SearchProgress:
    """What an unpickled SearchProgress becomes (see ``SearchProgress.__reduce__``)."""
    return _ACTIVE if _ACTIVE is not None else SearchProgress([], "val_accuracy", "max", epochs=1)


class _WriteWatch:
    """A console stream that remembers whether anyone wrote to it (or to its twin)."""

    def __init__(self, stream, flag_holder: Optional["_WriteWatch"] = None):
        self.stream, self._holder, self.foreign = stream, flag_holder, False

    def write(self, text: str) -> int:
        (self._holder or self).foreign = True
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
