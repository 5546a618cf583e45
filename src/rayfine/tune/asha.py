"""Ray Tune's ASHA with its rungs rebuilt when a search is resumed.

    scheduler = ResumableASHA(history=lambda trial_id: [...], time_attr="epoch", max_t=8,
                              grace_period=1, reduction_factor=2)

Tune saves its scheduler only once, inside tuner.pkl when the search is created, so
``Tuner.restore`` hands back an ASHA with empty rungs. A resumed search then judges the trials
that carry on against the few results that arrive after the resume: the first to reach a rung
passes it whatever its score. Here every trial Tune adds (on a resume: every trial of the
search, finished ones included) first has the epochs of its epoch log (``history``, which rayfine
writes before Tune hears of an epoch) recorded in its rungs, as ASHA recorded them when they
arrived; later decisions see the same rungs as in a search that was never stopped.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from rayfine.metrics import is_finite_number
from rayfine.tune.limits import SlotLimits
from rayfine.tune.trial import StopMarks


class ResumableASHA(SlotLimits, ASHAScheduler):
    """``ASHAScheduler`` whose rungs include what each trial reported before a resume, with the
    search's limits (``rayfine.tune.limits.SlotLimits``). A trial whose metric is NaN or infinite (a
    diverged loss) is stopped at once: Ray's ASHA never would (a NaN is below no rung's cutoff)."""

    def __init__(self, *, history: Optional[Callable[[str], Iterable[dict]]] = None, stops: StopMarks | None = None,
                 slots: int | None = None, max_failures: int | None = None, **asha):
        super().__init__(**asha)
        self._history = history
        self._stops = stops
        self._stopped_before: set[str] = set()  # trials a resumed search brings back that ASHA had stopped
        self._set_limits(slots, max_failures)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_stops", None)  # a search pickled before the marks existed
        self.__dict__.setdefault("_stopped_before", set())

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if self._history is None:
            return
        bracket = self._trial_info[trial.trial_id]
        replayed = False
        for record in self._history(trial.trial_id):
            # A NaN or infinite result was stopped, never recorded (on_trial_result); an infinite
            # val_loss would make a sparse rung's cutoff -inf or NaN, which stops nobody.
            if self._time_attr in record and is_finite_number(record.get(self._metric)):
                # The decision it returns was taken (and acted on) before the resume.
                bracket.on_result(trial, record[self._time_attr], self._metric_op * record[self._metric])
                replayed = True
        if (replayed and self._stops is not None and trial.status in (Trial.PENDING, Trial.PAUSED)
                and self._stops.marked(trial.trial_id)):
            self._stopped_before.add(trial.trial_id)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        # Ray stops a trial when its score is below the rung's cutoff, which a NaN never is, and
        # computes the cutoffs with nanpercentile: a diverged trial would train all its epochs.
        if self._metric in result and not is_finite_number(result[self._metric]):
            self._num_stopped += 1
            decision = TrialScheduler.STOP
        else:
            decision = super().on_trial_result(tune_controller, trial, result)
        # Before Tune acts on it; an early stop only: Ray's ASHA says STOP at max_t too, to a trial
        # that has trained all its epochs.
        epoch = result.get(self._time_attr)
        if decision == TrialScheduler.STOP and self._stops is not None and (epoch is None or epoch < self._max_t):
            self._stops.mark(trial.trial_id, epoch)
        return decision

    def choose_trial_to_run(self, tune_controller):
        # A stop the driver took but Tune had not saved: the trial stays stopped (StopMarks).
        for trial in tune_controller.get_trials():
            if trial.trial_id in self._stopped_before and trial.status in (Trial.PENDING, Trial.PAUSED):
                self._stopped_before.discard(trial.trial_id)
                tune_controller.stop_trial(trial)
        return super().choose_trial_to_run(tune_controller)
