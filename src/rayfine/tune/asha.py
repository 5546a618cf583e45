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


class ResumableASHA(SlotLimits, ASHAScheduler):
    """``ASHAScheduler`` whose rungs include what each trial reported before a resume, with the
    search's limits (``rayfine.tune.limits.SlotLimits``). A trial whose metric is NaN or infinite (a
    diverged loss) is stopped at once: Ray's ASHA never would (a NaN is below no rung's cutoff)."""

    def __init__(self, *, history: Optional[Callable[[str], Iterable[dict]]] = None, slots: int | None = None,
                 max_failures: int | None = None, **asha):
        super().__init__(**asha)
        self._history = history
        self._set_limits(slots, max_failures)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if self._history is None:
            return
        bracket = self._trial_info[trial.trial_id]
        for record in self._history(trial.trial_id):
            if self._time_attr in record and record.get(self._metric) is not None:
                # The decision it returns was taken (and acted on) before the resume.
                bracket.on_result(trial, record[self._time_attr], self._metric_op * record[self._metric])

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        # Ray stops a trial when its score is below the rung's cutoff, which a NaN never is, and
        # computes the cutoffs with nanpercentile: a diverged trial would train all its epochs.
        if self._metric in result and not is_finite_number(result[self._metric]):
            self._num_stopped += 1
            return TrialScheduler.STOP
        return super().on_trial_result(tune_controller, trial, result)
