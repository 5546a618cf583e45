"""How many trials of a search train at once, and how often Tune runs a failed trial again: the
plan of the driver that runs the search, also when it resumes a search another driver started.

    with resuming(RunLimits(concurrent=plan.concurrent, max_failures=base.train.max_failures)):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)

``Tuner.restore`` gives back the searcher and the scheduler pickled in tuner.pkl when the search
was created, then sets the searcher's saved state over it wholesale, and the trials it brings back
(and those its searcher draws next) carry the ``max_failures`` they were created with. A search
resumed with bigger trials or on a smaller cluster would start as many trials as the first driver
planned, more than fit (the late worker groups never get their CPUs: RAY_NOTES.md). The searchers
and schedulers here take the resuming driver's limits when Tuner.restore unpickles them, keep them
when Tune restores the searcher's state, and the schedulers hold back the trials Tune brings back
beyond them (PAUSED until a slot is free) and give every trial Tune adds the resuming driver's
``max_failures``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator


@dataclass(frozen=True)
class RunLimits:
    concurrent: int  # trials that train at once
    max_failures: int  # Tune runs a failed trial again this many times (train.max_failures)


_RESUMING: RunLimits | None = None


@contextlib.contextmanager
def resuming(limits: RunLimits) -> Iterator[None]:
    """While ``Tuner.restore`` unpickles the search: its searcher and scheduler take ``limits``."""
    global _RESUMING
    _RESUMING = limits
    try:
        yield
    finally:
        _RESUMING = None


def resumed_limits() -> RunLimits | None:
    return _RESUMING


class LimitedVariants(BasicVariantGenerator):
    """Tune's random/grid searcher, its ``max_concurrent`` that of the driver running the search."""

    def __setstate__(self, state):  # Tuner.restore unpickling tuner.pkl
        self.__dict__.update(state)
        if _RESUMING is not None:
            self.max_concurrent = _RESUMING.concurrent

    def set_state(self, state):  # the searcher's saved state, when the resumed search starts
        keep = self.max_concurrent
        super().set_state(state)
        self.max_concurrent = keep


class LimitedConcurrency(ConcurrencyLimiter):
    """``ConcurrencyLimiter`` (around Optuna), its ``max_concurrent`` that of the driver running the search."""

    def __setstate__(self, state):
        self.__dict__.update(state)
        if _RESUMING is not None:
            self.max_concurrent = _RESUMING.concurrent

    def set_state(self, state):
        keep = self.max_concurrent
        super().set_state(state)
        self.max_concurrent = keep


class SlotLimits:
    """Scheduler mixin: ``slots`` trials train at once, every trial gets ``max_failures``.

    The searcher draws no trial beyond the slots, but a resumed search brings back every trial
    that had not finished, PENDING, and Tune starts every PENDING trial: those beyond the slots
    wait PAUSED, and are chosen to run when a slot is free.
    """

    slots: int
    max_failures: int | None

    def _set_limits(self, slots: int, max_failures: int | None) -> None:
        self.slots, self.max_failures = slots, max_failures

    def __setstate__(self, state):
        self.__dict__.update(state)
        if _RESUMING is not None:  # also a search pickled before these limits existed
            self._set_limits(_RESUMING.concurrent, _RESUMING.max_failures)
        else:
            self.__dict__.setdefault("slots", None)
            self.__dict__.setdefault("max_failures", None)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        if self.max_failures is not None:
            trial.max_failures = self.max_failures
        super().on_trial_add(tune_controller, trial)

    def _hold_back(self, tune_controller) -> bool:
        """Pause the PENDING trials beyond the slots; True when no slot is left."""
        if not self.slots:
            return False
        busy = sum(1 for t in tune_controller.get_trials() if t.status == Trial.RUNNING)
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PENDING:
                if busy >= self.slots:
                    tune_controller._set_trial_status(trial, Trial.PAUSED)  # offered to schedulers by Tune's wrapper
                else:
                    busy += 1
        return busy >= self.slots

    def choose_trial_to_run(self, tune_controller):
        if self._hold_back(tune_controller):
            return None
        return super().choose_trial_to_run(tune_controller)


class LimitedFIFO(SlotLimits, FIFOScheduler):
    """Tune's FIFO scheduler with the search's limits (``SlotLimits``)."""

    def __init__(self, *, slots: int, max_failures: int | None = None):
        super().__init__()
        self._set_limits(slots, max_failures)
