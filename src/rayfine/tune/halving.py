"""Synchronous successive halving for Ray Tune: whole rungs, trials paused until their rung is complete.

    scheduler = SuccessiveHalving(metric="val_accuracy", mode="max", max_t=8, grace_period=1,
                                  reduction_factor=3, num_trials=16, slots=2)
    search_alg = SlotGatedVariants(scheduler.has_free_slot, random_state=0)

Every trial trains to the first rung (``grace_period`` epochs) and pauses there. When all
``num_trials`` have a result at a rung, the best ``max(1, n // reduction_factor)`` of them go on
to the next rung (``grace_period * reduction_factor**k`` epochs; the last one is ``max_t``) and
the others stop: 16 trials at grace 1 and factor 3 train to epochs 1, 3 and 8 as 16, 5 and 1
trials, 31 of the 128 epochs FIFO would train. Ray Tune's ASHA (``tune.scheduler: asha``) decides
on each result as it arrives instead, so it never waits, but it lets the first arrivals at each
rung through (bench/asha_replay.py compares the rules on recorded curves).

Ties rank by trial id (Tune's ids count up in the order the searcher drew the trials), so the
same results give the same decisions, also after ``rayfine tune --resume``: the scheduler
rebuilds its rungs from each trial's epoch log (``history``), which rayfine writes before Tune
hears of an epoch.

A paused trial gives its workers back; resumed, its Ray Train run (named after the trial)
continues from its last checkpoint. Tune starts every PENDING trial it has room for, and a trial
holds only its actor's 0.01 CPU in Tune's eyes, so the number of trials that train at once is
held here: ``has_free_slot`` gates the searcher (a paused trial frees its slot, unlike with
the searcher's own ``max_concurrent``), and ``choose_trial_to_run`` resumes promoted trials only
into free slots.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from rayfine.tune.limits import resumed_limits


def rung_milestones(max_t: int, grace_period: int, reduction_factor: float) -> list[int]:
    """The epochs at which trials are compared: grace, grace*rf, ... below max_t."""
    out, m = [], float(grace_period)
    while m < max_t:
        if int(m) not in out:  # a factor below 2 can round two rungs to one epoch
            out.append(int(m))
        m *= reduction_factor
    return out


class SuccessiveHalving(TrialScheduler):
    """Tune scheduler: synchronous successive halving keyed on ``time_attr`` (rayfine reports ``epoch``)."""

    def __init__(self, *, metric: str, mode: str, max_t: int, grace_period: int, reduction_factor: float,
                 num_trials: int, slots: int, time_attr: str = "epoch",
                 history: Optional[Callable[[str], Iterable[dict]]] = None, max_failures: int | None = None):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be max or min, not {mode!r}")
        self._metric, self._mode, self._time_attr = metric, mode, time_attr
        self.max_t, self.reduction_factor = max_t, reduction_factor
        self.milestones = rung_milestones(max_t, grace_period, reduction_factor)
        self.num_trials, self.slots = num_trials, slots
        self.max_failures = max_failures  # given to every trial Tune adds (rayfine.tune.limits)
        self._history = history
        self._values: list[dict[str, float]] = [{} for _ in self.milestones]  # rung -> {trial id: metric}
        self._promoted: list[Optional[set[str]]] = [None for _ in self.milestones]  # decided when complete
        self._epoch: dict[str, int] = {}  # the last epoch each trial reported
        self._trials: dict[str, Trial] = {}
        self._ended: set[str] = set()  # trials that ended: errored, or stopped (by this scheduler or by Tune)
        self._controller = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_controller"] = None  # Tune pickles the scheduler with the Tuner; the controller is per run
        state["_trials"] = {}
        return state

    def __setstate__(self, state):
        # Tuner.restore unpickles the scheduler the search was created with: a resumed search runs
        # with the resuming driver's limits (rayfine.tune.limits).
        self.__dict__.update(state)
        limits = resumed_limits()
        self.max_failures = limits.max_failures if limits else state.get("max_failures")
        if limits:
            self.slots = limits.concurrent

    # --- the rule -------------------------------------------------------------------------------

    def allowed_epochs(self, trial_id: str) -> int:
        """How far the trial may train now: to the next rung it has not been promoted past."""
        for k, promoted in enumerate(self._promoted):
            if promoted is None or trial_id not in promoted:
                return self.milestones[k]
        return self.max_t

    def _members(self, k: int) -> set[str]:
        if k == 0:
            return set(self._trials) | set(self._values[0])
        return set(self._promoted[k - 1] or ())

    def _complete(self, k: int) -> bool:
        if k > 0 and self._promoted[k - 1] is None:
            return False
        if k == 0 and len(self._trials) < self.num_trials and not self._search_finished():
            return False  # trials the searcher has yet to draw
        return all(t in self._values[k] or t in self._ended for t in self._members(k))

    def _search_finished(self) -> bool:
        """The searcher has drawn its last trial (fewer than num_trials, say, after a time budget)."""
        search_alg = getattr(self._controller, "search_alg", None)
        return bool(search_alg is not None and search_alg.is_finished())

    def _decide(self) -> None:
        """Close every rung that is complete: its best 1/reduction_factor go on, the rest stop."""
        for k in range(len(self.milestones)):
            if self._promoted[k] is not None:
                continue
            if not self._complete(k):
                return
            values = self._values[k]
            sign = -1.0 if self._mode == "max" else 1.0
            # The best first (a NaN, from a diverged trial, last), ties in the order trials were drawn.
            ranked = sorted((t for t in self._members(k) if t in values),
                            key=lambda t: (math.isnan(values[t]), sign * values[t], t))
            self._promoted[k] = set(ranked[: max(1, int(len(ranked) // self.reduction_factor))])

    def _record(self, trial_id: str, epoch: int, value: float) -> None:
        self._epoch[trial_id] = max(epoch, self._epoch.get(trial_id, 0))
        if epoch in self.milestones:
            self._values[self.milestones.index(epoch)].setdefault(trial_id, float(value))

    def _stopped(self, trial_id: str) -> bool:
        """Reached a rung that is closed without it."""
        return self._epoch.get(trial_id, 0) >= self.allowed_epochs(trial_id) and any(
            p is not None and trial_id not in p and trial_id in self._values[k] for k, p in enumerate(self._promoted))

    # --- Tune's scheduler interface ---------------------------------------------------------------

    @property
    def metric(self):
        return self._metric

    @property
    def supports_buffered_results(self) -> bool:
        return False  # a trial must pause at its rung's epoch, not a few results later

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return (metric is None or metric == self._metric) and (mode is None or mode == self._mode)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._controller = tune_controller
        self._trials[trial.trial_id] = trial
        if self.max_failures is not None:
            trial.max_failures = self.max_failures
        if trial.status in (Trial.TERMINATED, Trial.ERROR):  # a resumed search's finished trial
            self._ended.add(trial.trial_id)
        else:
            self._ended.discard(trial.trial_id)  # a failed trial Tune runs again
        if self._history is not None:  # a resumed search: what the trial trained before
            for record in self._history(trial.trial_id):
                if self._metric in record and self._time_attr in record:
                    self._record(trial.trial_id, int(record[self._time_attr]), record[self._metric])
        # No rung is decided here: a resumed search adds its trials one at a time after restoring
        # its searcher, which may have drawn them all; a rung closed then would leave out the
        # trials not added yet (choose_trial_to_run decides, once Tune has added them all).

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self._controller = tune_controller
        if self._time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        epoch = int(result[self._time_attr])
        self._record(trial.trial_id, epoch, result[self._metric])
        if epoch >= self.max_t or epoch < self.allowed_epochs(trial.trial_id):
            return TrialScheduler.CONTINUE
        self._decide()
        self._stop_losers(tune_controller, but=trial)
        if self._stopped(trial.trial_id):
            return TrialScheduler.STOP
        if epoch < self.allowed_epochs(trial.trial_id):
            return TrialScheduler.CONTINUE  # it closed its rung and goes on without a restart
        return TrialScheduler.PAUSE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._end(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        # Tune calls this for a trial it will run again (train.max_failures) too, and only then
        # adds it back (on_trial_add): it has already stopped that trial (ERROR) and still wants
        # to recover it (TuneController._try_recover). Its rung waits for it; only a trial that
        # failed for good (Tune calls this while the trial is still RUNNING or PENDING) leaves.
        if trial.status == Trial.ERROR and trial.should_recover():
            self._controller = tune_controller
            return
        self._end(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._end(tune_controller, trial)

    def _end(self, tune_controller, trial: Trial) -> None:
        self._controller = tune_controller
        self._ended.add(trial.trial_id)
        self._decide()
        self._stop_losers(tune_controller)

    def _stop_losers(self, tune_controller, but: Optional[Trial] = None) -> None:
        for trial in list(self._trials.values()):
            if (trial is not but and trial.trial_id not in self._ended
                    and trial.status in (Trial.PAUSED, Trial.PENDING) and self._stopped(trial.trial_id)):
                self._ended.add(trial.trial_id)  # before stop_trial, which calls on_trial_remove
                tune_controller.stop_trial(trial)

    def _busy(self, tune_controller) -> int:
        return sum(1 for t in tune_controller.get_trials() if t.status in (Trial.RUNNING, Trial.PENDING))

    def has_free_slot(self) -> bool:
        """Whether a new trial may start now (the searcher asks before drawing one)."""
        return self._controller is None or self._busy(self._controller) < self.slots

    def choose_trial_to_run(self, tune_controller) -> Optional[Trial]:
        self._controller = tune_controller
        self._decide()
        self._stop_losers(tune_controller)
        # A resumed search brings its paused trials back as PENDING, and Tune starts every PENDING
        # trial: those that must wait, or that do not fit in the slots, wait PAUSED.
        busy = sum(1 for t in tune_controller.get_trials() if t.status == Trial.RUNNING)
        for trial in tune_controller.get_trials():
            if trial.status != Trial.PENDING:
                continue
            waits = self._epoch.get(trial.trial_id, 0) >= self.allowed_epochs(trial.trial_id)
            if waits or busy >= self.slots:
                tune_controller._set_trial_status(trial, Trial.PAUSED)  # offered to schedulers by Tune's wrapper
            else:
                busy += 1
        if busy >= self.slots:
            return None
        ready = [t for t in tune_controller.get_trials()
                 if t.status == Trial.PAUSED and self._epoch.get(t.trial_id, 0) < self.allowed_epochs(t.trial_id)]
        # The highest rung first, then in the order the trials were drawn.
        ready.sort(key=lambda t: (-self._epoch.get(t.trial_id, 0), t.trial_id))
        return ready[0] if ready else None

    def debug_string(self) -> str:
        rungs = ", ".join(f"epoch {m}: {len(v)} result(s)" + ("" if p is None else f", {len(p)} promoted")
                          for m, v, p in zip(self.milestones, self._values, self._promoted))
        return f"SuccessiveHalving: {rungs}"


class SlotGatedVariants(BasicVariantGenerator):
    """Tune's random/grid searcher drawing a new trial only while ``gate()`` says a slot is free.

    Its own ``max_concurrent`` counts paused trials as running, which would leave a halving
    search waiting for rungs that no new trial can fill.
    """

    def __init__(self, gate: Callable[[], bool], **kwargs):
        super().__init__(**kwargs)
        self._gate = gate

    def next_trial(self):
        return super().next_trial() if self._gate() else None

    def get_state(self):
        state = super().get_state()
        if state:
            state = {k: v for k, v in state.items() if k != "_gate"}
        return state

    def set_state(self, state):
        gate = self._gate  # the restored experiment's scheduler, not a copy from the saved state
        super().set_state(state)
        self._gate = gate
