"""Synchronous successive halving (rayfine.tune.halving) driven by a stand-in Tune controller: the
rule, the slots it holds, and rebuilding its rungs from the trials' epoch logs on a resume
(tests/test_tune_resume.py runs it in a real search, killed and resumed); and ASHA's rungs
rebuilt the same way (rayfine.tune.asha)."""

from __future__ import annotations

from ray import tune
from ray.tune.experiment import Experiment, Trial
from ray.tune.schedulers import TrialScheduler

from rayfine.tune.halving import SlotGatedVariants, SuccessiveHalving, rung_milestones


class FakeTrial:
    def __init__(self, trial_id: str, max_failures: int = 0):
        self.trial_id, self.status = trial_id, Trial.PENDING
        self.max_failures, self.num_failures = max_failures, 0

    def should_recover(self) -> bool:  # as Tune's Trial.should_recover
        return self.num_failures <= self.max_failures or self.max_failures < 0


class FakeController:
    """What the scheduler uses of Tune's controller: its trials, stop_trial and _set_trial_status."""

    def __init__(self, scheduler):
        self.scheduler, self.trials = scheduler, []

    def add(self, trial_id: str, status: str = Trial.PENDING) -> FakeTrial:
        trial = FakeTrial(trial_id)
        trial.status = status
        self.trials.append(trial)
        self.scheduler.on_trial_add(self, trial)
        return trial

    def get_trials(self):
        return list(self.trials)

    def _set_trial_status(self, trial, status):
        trial.status = status

    def stop_trial(self, trial):
        if trial.status in (Trial.PENDING, Trial.PAUSED):
            self.scheduler.on_trial_remove(self, trial)
        trial.status = Trial.TERMINATED

    def fail(self, trial) -> None:
        """As Tune's TuneController._process_trial_failure: a trial it recovers is stopped (ERROR),
        the scheduler hears on_trial_error, and the trial comes back PENDING (on_trial_add)."""
        trial.num_failures += 1
        if trial.status == Trial.RUNNING and trial.should_recover():
            trial.status = Trial.ERROR  # _try_recover -> _schedule_trial_stop
            self.scheduler.on_trial_error(self, trial)  # _requeue_trial
            trial.status = Trial.PENDING
            self.trials.remove(trial)
            self.trials.append(trial)
            self.scheduler.on_trial_add(self, trial)
        else:
            self.scheduler.on_trial_error(self, trial)
            trial.status = Trial.ERROR

    def report(self, trial, epoch: int, value: float) -> str:
        result = {"epoch": epoch, self.scheduler.metric: value}
        decision = self.scheduler.on_trial_result(self, trial, result)
        trial.status = {TrialScheduler.PAUSE: Trial.PAUSED, TrialScheduler.STOP: Trial.TERMINATED}.get(
            decision, trial.status)
        return decision


def halving(num_trials=4, slots=2, rf=2, max_t=4, history=None):
    return SuccessiveHalving(metric="val_accuracy", mode="max", max_t=max_t, grace_period=1, reduction_factor=rf,
                             num_trials=num_trials, slots=slots, history=history)


def test_milestones():
    assert rung_milestones(8, 1, 2) == [1, 2, 4]
    assert rung_milestones(8, 1, 3) == [1, 3]
    assert rung_milestones(3, 1, 2) == [1, 2]
    assert rung_milestones(8, 2, 4) == [2]
    assert rung_milestones(4, 1, 1.5) == [1, 2, 3]


def test_whole_rungs_decide_and_paused_trials_hold_no_slot():
    s = halving()
    c = FakeController(s)
    a, b = c.add("t_00000"), c.add("t_00001")
    for t in (a, b):
        t.status = Trial.RUNNING
    assert not s.has_free_slot()  # two train: the searcher draws no third
    assert c.report(a, 1, 0.9) == TrialScheduler.PAUSE
    assert s.has_free_slot()  # a paused trial frees its slot
    assert s.choose_trial_to_run(c) is None  # a is not promoted yet: the rung is incomplete
    c2 = c.add("t_00002")
    c2.status = Trial.RUNNING
    assert c.report(b, 1, 0.2) == TrialScheduler.PAUSE
    d = c.add("t_00003")
    d.status = Trial.RUNNING
    assert c.report(c2, 1, 0.5) == TrialScheduler.PAUSE
    # The last result closes the rung: the best 4 // 2 = 2 (a and d) go on, b and c2 stop.
    assert c.report(d, 1, 0.7) == TrialScheduler.CONTINUE
    assert b.status == c2.status == Trial.TERMINATED and a.status == Trial.PAUSED
    assert s.choose_trial_to_run(c) is a  # one slot is free: a resumes
    a.status = Trial.RUNNING
    assert s.choose_trial_to_run(c) is None  # both slots train
    assert c.report(d, 2, 0.8) == TrialScheduler.PAUSE
    assert c.report(a, 2, 0.8) == TrialScheduler.CONTINUE  # a tie: the earlier trial (a) goes to max_t
    assert d.status == Trial.TERMINATED
    assert c.report(a, 3, 0.9) == TrialScheduler.CONTINUE and c.report(a, 4, 0.95) == TrialScheduler.CONTINUE
    assert s.allowed_epochs("t_00000") == 4 and s.allowed_epochs("t_00001") == 1 and s.allowed_epochs("t_00003") == 2


def test_a_failed_trial_leaves_its_rung_and_min_mode_ranks_low_first_and_nan_last():
    s = SuccessiveHalving(metric="val_loss", mode="min", max_t=4, grace_period=1, reduction_factor=2,
                          num_trials=3, slots=3)
    c = FakeController(s)
    a, b, d = c.add("t_0"), c.add("t_1"), c.add("t_2")
    assert c.report(a, 1, float("nan")) == TrialScheduler.PAUSE  # diverged: ranks last, whatever the mode
    assert c.report(b, 1, 0.1) == TrialScheduler.PAUSE
    s.on_trial_error(c, d)  # the rung closes without it: the best 2 // 2 = 1 (b) goes on
    d.status = Trial.ERROR
    assert a.status == Trial.TERMINATED and s.choose_trial_to_run(c) is b


def test_a_trial_that_tune_runs_again_keeps_its_place_in_its_rung_and_goes_on_on_merit():
    """With train.max_failures, Tune retries a failed trial: on_trial_error, then on_trial_add. The
    rung waits for it (it is not closed with the others), and its result ranks like any other;
    only its last allowed failure ends it."""
    s = halving(num_trials=4, slots=4)
    c = FakeController(s)
    a, b, d, e = (c.add(f"t_{i}") for i in range(4))
    for t in (a, b, d, e):
        t.max_failures, t.status = 1, Trial.RUNNING
    assert c.report(a, 1, 0.5) == c.report(b, 1, 0.4) == c.report(d, 1, 0.3) == TrialScheduler.PAUSE
    c.fail(e)  # retried: the rung still waits for it
    assert e.status == Trial.PENDING and s._promoted[0] is None
    assert [t.status for t in (a, b, d)] == [Trial.PAUSED] * 3
    e.status = Trial.RUNNING
    # Its epoch 1 is the best: it and a (4 // 2 = 2) go on, b and d stop.
    assert c.report(e, 1, 0.9) == TrialScheduler.CONTINUE
    assert b.status == d.status == Trial.TERMINATED and s.choose_trial_to_run(c) is a
    a.status = Trial.RUNNING
    assert c.report(a, 2, 0.6) == TrialScheduler.PAUSE
    c.fail(e)  # its second failure is its last: the rung closes without it, and a goes on to max_t
    assert e.status == Trial.ERROR and s.choose_trial_to_run(c) is a and s.allowed_epochs(a.trial_id) == 4


def test_a_searcher_that_ends_early_closes_the_first_rung_with_the_trials_it_drew():
    s = halving(num_trials=4)
    c = FakeController(s)
    a, b = c.add("t_0"), c.add("t_1")
    assert c.report(a, 1, 0.9) == TrialScheduler.PAUSE
    assert c.report(b, 1, 0.1) == TrialScheduler.PAUSE  # two of four: the rung waits
    c.search_alg = type("Finished", (), {"is_finished": lambda self: True})()
    assert s.choose_trial_to_run(c) is a and b.status == Trial.TERMINATED


def test_a_resumed_search_rebuilds_its_rungs_from_the_epoch_logs():
    logs = {"t_0": [{"epoch": 1, "val_accuracy": 0.9}], "t_1": [{"epoch": 1, "val_accuracy": 0.2}],
            "t_2": [{"epoch": 1, "val_accuracy": 0.5}], "t_3": []}
    s = halving(history=lambda trial_id: logs[trial_id])
    c = FakeController(s)
    trials = [c.add(t) for t in logs]  # Tune brings unfinished trials back PENDING, all of them
    assert s.choose_trial_to_run(c) is None
    # t_3 never reached the rung: it trains; the others wait for it, paused; none is stopped yet.
    assert [t.status for t in trials] == [Trial.PAUSED, Trial.PAUSED, Trial.PAUSED, Trial.PENDING]
    trials[3].status = Trial.RUNNING
    assert c.report(trials[3], 1, 0.1) == TrialScheduler.STOP
    assert [t.status for t in trials[:3]] == [Trial.PAUSED, Trial.TERMINATED, Trial.PAUSED]
    assert s.choose_trial_to_run(c) is trials[0]


def test_a_resumed_search_decides_its_rungs_only_once_every_trial_is_back():
    """Tune restores the searcher first (here it had drawn every trial), then adds the trials one at
    a time, in the order its saved state lists them: the first one alone is no complete rung."""
    logs = {"t_1": [{"epoch": 1, "val_accuracy": 0.125}], "t_0": [{"epoch": 1, "val_accuracy": 0.125}],
            "t_2": [{"epoch": 1, "val_accuracy": 0.125}], "t_3": []}
    s = halving(num_trials=4, rf=3, max_t=3, history=lambda trial_id: logs[trial_id])
    c = FakeController(s)
    c.search_alg = type("Finished", (), {"is_finished": lambda self: True})()
    # Interrupted after the rung had stopped t_2 and promoted t_0 (a three-way tie: the earliest
    # drawn goes on), before t_1's stop was saved; t_3 had ended before its first epoch (Tune
    # brings finished trials back TERMINATED: the rung does not wait for them).
    t_1, t_0 = c.add("t_1"), c.add("t_0")
    c.add("t_2", Trial.TERMINATED)
    c.add("t_3", Trial.TERMINATED)
    s.choose_trial_to_run(c)
    # t_0 goes on (left PENDING: Tune starts it), t_1 stops.
    assert t_0.status == Trial.PENDING and t_1.status == Trial.TERMINATED
    assert s.allowed_epochs("t_0") == 3 and s.allowed_epochs("t_1") == 1


def test_the_gated_searcher_draws_only_into_free_slots_and_keeps_its_gate_on_restore(tmp_path):
    open_ = [True]
    search = SlotGatedVariants(lambda: open_[0], random_state=0)
    # A storage_path of the test's own: Tune writes a marker there (the default is ~/ray_results).
    search.add_configurations(Experiment("gate", run=lambda config: None, config={"x": tune.grid_search([1, 2, 3])},
                                         storage_path=str(tmp_path)))
    assert search.next_trial() is not None
    open_[0] = False
    assert search.next_trial() is None and not search.is_finished()
    state = search.get_state()
    assert "_gate" not in state
    search.set_state(state)
    open_[0] = True
    assert search.next_trial() is not None


def test_asha_rebuilds_its_rungs_on_a_resume():
    """rayfine.tune.asha.ResumableASHA: Tune restores a search's ASHA with empty rungs; rebuilt from
    the epoch logs, it decides as the search that was never stopped would have."""
    from rayfine.tune.asha import ResumableASHA

    def asha(history=None):
        scheduler = ResumableASHA(history=history, time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2)
        scheduler.set_search_properties("val_accuracy", "max")
        return scheduler

    # Val accuracy per epoch before the driver was killed: b was stopped at the first rung, c was
    # training its second epoch.
    logs = {"a": [0.9, 0.92], "b": [0.5], "c": [0.7]}
    uninterrupted = FakeController(asha())
    for trial_id, values in logs.items():
        trial = uninterrupted.add(trial_id)
        for epoch, value in enumerate(values, 1):
            uninterrupted.report(trial, epoch, value)

    history = {t: [{"epoch": e, "val_accuracy": v, "checkpoint_path": "..."} for e, v in enumerate(vs, 1)]
               for t, vs in logs.items()}
    resumed = FakeController(asha(history=lambda trial_id: history.get(trial_id, [])))
    for trial_id in logs:  # Tune adds every restored trial, finished or not
        resumed.add(trial_id)
    forgetful = FakeController(asha())  # what Tune's own ASHA has after a resume
    for trial_id in logs:
        forgetful.add(trial_id)
    # A new trial at epoch 1 (0.6, below the first rung's median 0.7), and c, resumed, at epoch 2
    # (0.65, below a's 0.92 there): both stop in the search that was never stopped.
    for controller in (uninterrupted, resumed, forgetful):
        controller.add("d")
    decisions = {name: (c.report(c.trials[-1], 1, 0.6), c.report(c.trials[2], 2, 0.65))
                 for name, c in (("uninterrupted", uninterrupted), ("resumed", resumed), ("forgetful", forgetful))}
    assert decisions["uninterrupted"] == decisions["resumed"] == (TrialScheduler.STOP, TrialScheduler.STOP)
    assert decisions["forgetful"] == (TrialScheduler.CONTINUE, TrialScheduler.CONTINUE)


def test_an_asha_stop_the_driver_took_before_it_was_killed_holds_after_a_resume(tmp_path):
    """Tune saves its trials' state at most every 10 s: a trial ASHA stopped just before the driver was
    killed comes back PENDING. ASHA's decision depends on the order results arrived in, so it is kept
    (rayfine.tune.trial.StopMarks, a file beside the trial's epoch log), not taken again: the trial
    stays stopped, and the others go on. A record that is not a finite number enters no rung."""
    from rayfine.tune.asha import ResumableASHA
    from rayfine.tune.trial import StopMarks

    def asha(history=None):
        scheduler = ResumableASHA(history=history, stops=StopMarks(str(tmp_path)), time_attr="epoch", max_t=4,
                                  grace_period=1, reduction_factor=2)
        scheduler.set_search_properties("val_loss", "min")
        return scheduler

    first = FakeController(asha())
    a, b = first.add("a"), first.add("b")
    assert first.report(a, 1, 0.3) == TrialScheduler.CONTINUE
    assert first.report(b, 1, 0.5) == TrialScheduler.STOP  # below a's cutoff: marked before Tune hears
    for epoch in (2, 3):
        first.report(a, epoch, 0.2)
    assert first.report(a, 4, 0.1) == TrialScheduler.STOP  # Ray's ASHA ends a trial at max_t: no mark
    assert sorted(p.parent.name for p in tmp_path.rglob("stopped_by_asha.json")) == ["trial_b"]

    logs = {"a": [0.3], "b": [0.5], "c": [float("inf")]}
    history = {t: [{"epoch": e, "val_loss": v} for e, v in enumerate(vs, 1)] for t, vs in logs.items()}
    resumed = FakeController(asha(history=lambda trial_id: history.get(trial_id, [])))
    a, b, c = (resumed.add(t) for t in "abc")  # Tune brings all three back PENDING
    assert resumed.scheduler.choose_trial_to_run(resumed) is a
    assert (a.status, b.status, c.status) == (Trial.PENDING, Trial.TERMINATED, Trial.PENDING)
    # The rung holds a's 0.3 and b's 0.5 (cutoff 0.4), not c's infinite val_loss (which would make it 0.5).
    assert resumed.report(resumed.add("d"), 1, 0.45) == TrialScheduler.STOP


def test_asha_stops_a_trial_whose_metric_is_not_a_number():
    """rayfine.tune.asha.ResumableASHA: a diverged trial (val_loss NaN or infinite) stops at its first
    result; Ray's ASHA passes a NaN at every rung (NaN < cutoff is never true). Finite results are
    judged as before."""
    from rayfine.tune.asha import ResumableASHA

    asha = ResumableASHA(time_attr="epoch", max_t=8, grace_period=1, reduction_factor=2)
    asha.set_search_properties("val_loss", "min")
    c = FakeController(asha)
    # The first to reach the rung: a number would pass it whatever its value.
    assert c.report(c.add("t_0"), 1, float("nan")) == TrialScheduler.STOP
    good, worse = c.add("t_1"), c.add("t_2")
    assert c.report(good, 1, 0.2) == TrialScheduler.CONTINUE  # the NaN is no score to beat
    assert c.report(worse, 1, 0.4) == TrialScheduler.STOP  # below the rung's cutoff
    assert c.report(good, 2, 0.15) == TrialScheduler.CONTINUE
    assert c.report(good, 3, float("nan")) == TrialScheduler.STOP  # diverged between rungs
    for i, value in enumerate((float("inf"), float("-inf")), 3):
        assert c.report(c.add(f"t_{i}"), 1, value) == TrialScheduler.STOP
    late = c.add("t_5")
    assert c.report(late, 1, 0.1) == TrialScheduler.CONTINUE  # better than the rung's cutoff
    assert "num_stopped=5" in asha.debug_string()


def test_trials_a_resumed_search_brings_back_beyond_its_slots_wait_paused():
    """A resumed search brings back every unfinished trial PENDING and Tune starts every PENDING
    trial: with fewer slots than before (bigger trials, a smaller cluster), those beyond wait
    PAUSED and run when a slot is free (ASHA and FIFO; halving does so in its own rule)."""
    from rayfine.tune.asha import ResumableASHA
    from rayfine.tune.limits import LimitedFIFO

    asha = ResumableASHA(slots=1, max_failures=2, time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2)
    asha.set_search_properties("val_accuracy", "max")
    for scheduler in (asha, LimitedFIFO(slots=1, max_failures=2)):
        c = FakeController(scheduler)
        a, b = c.add("t_0"), c.add("t_1")
        assert a.max_failures == b.max_failures == 2
        # a stays PENDING (Tune starts it), b waits.
        assert scheduler.choose_trial_to_run(c) is None and (a.status, b.status) == (Trial.PENDING, Trial.PAUSED)
        a.status = Trial.RUNNING
        assert scheduler.choose_trial_to_run(c) is None and b.status == Trial.PAUSED
        a.status = Trial.TERMINATED
        assert scheduler.choose_trial_to_run(c) is b


def test_halving_gives_every_trial_the_searchs_max_failures():
    s = SuccessiveHalving(metric="val_accuracy", mode="max", max_t=4, grace_period=1, reduction_factor=2,
                          num_trials=2, slots=2, max_failures=3)
    assert FakeController(s).add("t_0").max_failures == 3
