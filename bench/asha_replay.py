"""Schedulers replayed on recorded learning curves: Ray Tune's ASHA and promotion-based ASHA.

    python bench/asha_replay.py            # reads results.json["asha_curves"], writes ["asha_replay"]

Input: bench/asha_curves.py's record, every configuration of the asha setting trained to the end
with the validation figures and the test accuracy of every epoch. Each seed's configurations are
replayed, in the order the searcher drew them, on ``SLOTS`` trial slots (two trials at once, as in
bench/asha.py), each epoch taking the seconds it took when recorded and each trial start (or
resume) ``START_S`` more, under two rules:

- ``stopping``: Ray Tune's ASHAScheduler (``AsyncHyperBandScheduler``), its own ``_Bracket``
  deciding after every epoch whether the trial goes on; a stopped trial never comes back.
  This is what `rayfine tune` runs (tune.scheduler: asha) and what bench/asha.py measures.
- ``promotion``: ASHA as its paper defines it (Li et al., "A System for Massively Parallel
  Hyperparameter Tuning", MLSys 2020, Algorithm 2): a trial that reaches a rung pauses there;
  whenever a slot is free, the best paused trial among the top 1/eta of its rung is promoted to
  the next rung (highest rung first), else a new configuration starts. A trial is never judged
  on a rung before 1/eta of it has results, so the first arrivals are not waved through.
- ``synchronous``: successive halving with whole rungs (every trial to the first rung, then the
  top 1/eta of each complete rung): the fewest epochs halving can train, for reference.

Then a sweep: every rule again at grace periods 1-2 x reduction factors 2-4 (``sweep``), and more
configurations per search (``pooled``): searches of 16 up to all of the recorded configurations,
drawn from every seed's curves together (the seeds draw from the same search space and train on
the same splits), at the asha setting's grace period and reduction factor.

The winner of each replay is picked as `rayfine tune` picks it (the best validation accuracy of
any trial epoch that ran, ties to the earlier epoch) and scored by the recorded test accuracy of
that epoch's checkpoint. Replayed, not measured: a real search differs in the order in which trials
reach their rungs (start-up and epoch times vary), which the stopping rule is sensitive to.
"""

from __future__ import annotations

import heapq
import random
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from rayfine.tune.halving import rung_milestones  # the rungs `tune.scheduler: halving` uses

SLOTS = 2
START_S = 12.0  # a trial's start-up before its first epoch (its Ray Train worker group), and each resume's


class Trial:
    def __init__(self, index: int, record: dict):
        self.index = index
        self.id = record["trial"]
        self.epochs = record["epochs"]  # [{"epoch", "val_accuracy", "val_loss", "epoch_s", "test_accuracy"}]
        self.ran = 0  # epochs trained so far

    def val(self, epoch: int) -> float:
        return self.epochs[epoch - 1]["val_accuracy"]


class _TrialId:  # what Ray's _Bracket needs of a trial
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def replay_stopping(trials: list[Trial], max_t: int, grace: int, eta: float, slots: int = SLOTS,
                    start_s: float = START_S) -> float:
    """Ray Tune's asynchronous successive halving, its own bracket deciding; returns the wall time."""
    from ray.tune.schedulers.async_hyperband import _Bracket

    bracket = _Bracket(min_t=grace, max_t=max_t, reduction_factor=eta, s=0)
    queue = list(trials)
    events: list[tuple[float, int, Trial]] = []  # (time the trial's next epoch ends, index, trial)

    def start(trial: Trial, now: float) -> None:
        heapq.heappush(events, (now + start_s + trial.epochs[0]["epoch_s"], trial.index, trial))

    now = 0.0
    for _ in range(min(slots, len(queue))):
        start(queue.pop(0), now)
    while events:
        now, _, trial = heapq.heappop(events)
        trial.ran += 1
        action = bracket.on_result(_TrialId(trial.id), trial.ran, trial.val(trial.ran))
        if action == "STOP" or trial.ran >= max_t:
            if queue:
                start(queue.pop(0), now)
        else:
            heapq.heappush(events, (now + trial.epochs[trial.ran]["epoch_s"], trial.index, trial))
    return now


def replay_promotion(trials: list[Trial], max_t: int, grace: int, eta: float, slots: int = SLOTS,
                     start_s: float = START_S) -> float:
    """ASHA with promotions (Li et al. 2020, Algorithm 2) over a finite set of configurations."""
    milestones = rung_milestones(max_t, grace, eta)
    results: list[dict[int, float]] = [{} for _ in milestones]  # rung -> {trial index: val accuracy}
    paused: list[set[int]] = [set() for _ in milestones]  # trials waiting at each rung
    queue = list(trials)
    events: list[tuple[float, int, Trial, int]] = []  # (time the epoch ends, index, trial, target epoch)

    def run(trial: Trial, now: float, target: int, resume: bool) -> None:
        cost = (start_s if resume else 0.0) + trial.epochs[trial.ran]["epoch_s"]
        heapq.heappush(events, (now + cost, trial.index, trial, target))

    def promotable(k: int) -> Optional[int]:
        ranked = sorted(results[k], key=lambda i: (-results[k][i], i))
        top = ranked[: int(len(ranked) // eta)]
        waiting = [i for i in top if i in paused[k]]
        return waiting[0] if waiting else None

    def next_job(now: float, just_paused: Optional[Trial]) -> bool:
        for k in reversed(range(len(milestones))):
            i = promotable(k)
            if i is not None:
                paused[k].discard(i)
                trial = trials[i]
                target = milestones[k + 1] if k + 1 < len(milestones) else max_t
                # The trial that has just reached the rung goes on without a restart.
                run(trial, now, target, resume=trial is not just_paused)
                return True
        if queue:  # a new trial pays the start-up a resume pays; with no rung below max_t, it runs to the end
            run(queue.pop(0), now, milestones[0] if milestones else max_t, resume=True)
            return True
        return False

    now, free = 0.0, slots
    while free and next_job(now, None):
        free -= 1
    while events:
        now, _, trial, target = heapq.heappop(events)
        trial.ran += 1
        if trial.ran < target:
            run(trial, now, target, resume=False)
            continue
        just_paused = None
        if trial.ran < max_t:
            k = milestones.index(trial.ran)
            results[k][trial.index] = trial.val(trial.ran)
            paused[k].add(trial.index)
            just_paused = trial
        free += 1
        while free and next_job(now, just_paused):
            free -= 1
            just_paused = None
    return now


def replay_synchronous(trials: list[Trial], max_t: int, grace: int, eta: float, slots: int = SLOTS,
                       start_s: float = START_S) -> float:
    """Synchronous successive halving, the reference: every trial to the first rung, then the top
    1/eta of each complete rung to the next. No wall time (a real one waits for whole rungs)."""
    alive = list(trials)
    for milestone in rung_milestones(max_t, grace, eta):
        for t in alive:
            t.ran = milestone
        alive = sorted(alive, key=lambda t: (-t.val(milestone), t.index))[: int(len(alive) // eta)]
    for t in alive:
        t.ran = max_t
    return 0.0


RULES = {"stopping": replay_stopping, "promotion": replay_promotion, "synchronous": replay_synchronous}


def winner(trials: list[Trial]) -> tuple[Trial, int]:
    """`rayfine tune`'s pick: the best validation accuracy of any epoch run, ties to the earlier epoch
    (then the earlier trial)."""
    rows = [(t, e) for t in trials for e in range(1, t.ran + 1)]
    return max(rows, key=lambda r: (r[0].val(r[1]), -r[1], -r[0].index))


def trials_of(record: dict) -> list[Trial]:
    """A seed's trials in the order the searcher drew them (their ids count up)."""
    return [Trial(i, r) for i, r in enumerate(sorted(record["trials"], key=lambda r: r["trial"]))]


def replay_seed(record: dict, rule: str, max_t: int, grace: int, eta: float, slots: int = SLOTS,
                start_s: float = START_S) -> dict:
    trials = trials_of(record)
    wall = RULES[rule](trials, max_t, grace, eta, slots, start_s)
    best, epoch = winner(trials)
    return {"epochs": sum(t.ran for t in trials), "stopped_after": sorted(t.ran for t in trials),
            "worker_s": sum(t.epochs[e]["epoch_s"] for t in trials for e in range(t.ran)), "wall_s": wall,
            "winner": best.id, "winner_epoch": epoch, "best_val_accuracy": best.val(epoch),
            "best_test_accuracy": best.epochs[epoch - 1]["test_accuracy"]}


def val_rows(record: dict) -> int:
    """Validation images (recorded since asha_curves wrote it; before, the step between accuracies)."""
    if "val_rows" in record:
        return record["val_rows"]
    values = sorted({e["val_accuracy"] for t in record["trials"] for e in t["epochs"]})
    return round(1 / min(b - a for a, b in zip(values, values[1:]) if b - a > 1e-9))


def full_budget(record: dict, max_t: int) -> dict:
    """Every configuration to max_t (FIFO); and how far apart on the test split the epochs are that
    validation cannot tell from the winner (within one validation image of it)."""
    trials = trials_of(record)
    for t in trials:
        t.ran = max_t
    best, epoch = winner(trials)
    best_val = best.val(epoch)
    near = [e["test_accuracy"] for t in trials for e in t.epochs[:max_t] if e["val_accuracy"] >= best_val - 1.001 / val_rows(record)]
    return {"epochs": len(trials) * max_t, "worker_s": sum(e["epoch_s"] for t in trials for e in t.epochs[:max_t]),
            "best_test_accuracy": best.epochs[epoch - 1]["test_accuracy"], "winner": best.id, "winner_epoch": epoch,
            "near_best_epochs": len(near), "near_best_test_min": min(near), "near_best_test_max": max(near)}


# Settings the sweep replays besides the asha setting's own: does any rule reach the goal here?
SWEEP_GRACE = (1, 2)
SWEEP_ETA = (2, 3, 4)
GOAL_COMPUTE, GOAL_GAP = 0.35, 0.005


def sweep(records: list[dict], max_t: int) -> list[dict]:
    """Every rule at every grace period x reduction factor of the sweep, on every seed: compute_ratio
    and accuracy_gap (median and spread over the seeds), and whether the medians meet the goal."""
    fulls = [full_budget(record, max_t) for record in records]  # the same for every setting
    rows = []
    for rule in RULES:
        for grace in SWEEP_GRACE:
            for eta in SWEEP_ETA:
                ratios, gaps = [], []
                for record, full in zip(records, fulls):
                    r = replay_seed(record, rule, max_t, grace, eta)
                    ratios.append(r["epochs"] / full["epochs"])
                    gaps.append(full["best_test_accuracy"] - r["best_test_accuracy"])
                ratio, gap = common.summary(ratios), common.summary(gaps)
                rows.append({"rule": rule, "grace_period": grace, "reduction_factor": eta, "compute_ratio": ratio,
                             "accuracy_gap": gap,
                             "goal_met": ratio["median"] <= GOAL_COMPUTE and gap["median"] <= GOAL_GAP})
    return rows


POOLED_DRAWS = 60  # searches drawn per size


def pooled(records: list[dict], max_t: int, grace: int, eta: float, draws: int = POOLED_DRAWS, seed: int = 0) -> list[dict]:
    """More configurations per search: ``n`` configurations drawn (in a random order, without
    replacement, ``draws`` times) from every record's trials together, for n = one seed's count,
    1.5x, 2x and all of them; each draw replayed under every rule and compared with its own full
    budget. compute_ratio and accuracy_gap over the draws, and whether their medians meet the goal."""
    pool = [t for record in records for t in record["trials"]]
    rows_val = val_rows(records[0])
    n0 = len(records[0]["trials"])
    rng = random.Random(seed)
    rows = []
    for n in sorted({n0, n0 * 3 // 2, 2 * n0, len(pool)}):
        if n > len(pool):
            continue
        samples = [rng.sample(pool, n) for _ in range(draws)]  # all of them: in a new order each time
        searches = [{"trials": [{**t, "trial": f"{k:04d}"} for k, t in enumerate(sample)], "val_rows": rows_val}
                    for sample in samples]  # ids in the order drawn: the order the replay starts them
        fulls = [full_budget(search, max_t) for search in searches]
        for rule in RULES:
            replays = [replay_seed(search, rule, max_t, grace, eta) for search in searches]
            ratio = common.summary(r["epochs"] / f["epochs"] for r, f in zip(replays, fulls))
            gap = common.summary(f["best_test_accuracy"] - r["best_test_accuracy"] for r, f in zip(replays, fulls))
            rows.append({"configs": n, "rule": rule, "draws": len(searches), "compute_ratio": ratio, "accuracy_gap": gap,
                         "goal_met": ratio["median"] <= GOAL_COMPUTE and gap["median"] <= GOAL_GAP})
    return rows


def main() -> None:
    args = common.parse_args(__doc__.splitlines()[0])
    curves = common.read_results(args.results).get("asha_curves")
    if not curves or not curves.get("per_seed"):
        raise SystemExit(f"no asha_curves in {args.results}: run bench/asha_curves.py{' --quick' if args.quick else ''} "
                         "with the same --results first")
    s = curves["setting"]
    max_t, grace, eta = s["max_epochs"], s["grace_period"], s["reduction_factor"]
    per_seed = []
    for record in curves["per_seed"]:
        full = full_budget(record, max_t)
        row = {"seed": record["seed"], "full": full}
        for rule in RULES:
            r = replay_seed(record, rule, max_t, grace, eta)
            r["compute_ratio"] = r["epochs"] / full["epochs"]
            r["worker_seconds_ratio"] = r["worker_s"] / full["worker_s"]
            r["accuracy_gap"] = full["best_test_accuracy"] - r["best_test_accuracy"]
            row[rule] = r
            common.log(f"seed {record['seed']} {rule:9s}: {r['epochs']}/{full['epochs']} epochs "
                       f"({r['compute_ratio']:.3f}), gap {r['accuracy_gap']:+.4f}, stopped after {r['stopped_after']}")
        per_seed.append(row)
    result = {"per_seed": per_seed, "setting": {**s, "slots": SLOTS, "start_s": START_S},
              "compared": "Ray Tune's ASHA (stopping), promotion-based ASHA and synchronous successive halving "
                          "replayed on the recorded curves of asha_curves: epochs / the full budget's, and the test "
                          "accuracy of each replay's winner against the full budget's winner (replayed, not measured)"}
    result["sweep"] = sweep(curves["per_seed"], max_t)
    for row in result["sweep"]:
        common.log(f"sweep {row['rule']:9s} grace {row['grace_period']} eta {row['reduction_factor']}: compute_ratio "
                   f"{row['compute_ratio']['values']}, gap {row['accuracy_gap']['values']}, goal met: {row['goal_met']}")
    result["pooled"] = pooled(curves["per_seed"], max_t, grace, eta)
    for row in result["pooled"]:
        common.log(f"pooled {row['configs']} configs {row['rule']:9s}: compute_ratio median {row['compute_ratio']['median']:.3f}, "
                   f"gap median {row['accuracy_gap']['median']:+.4f} over {row['draws']} draw(s), goal met: {row['goal_met']}")
    for rule in RULES:
        for key in ("compute_ratio", "accuracy_gap", "worker_seconds_ratio"):
            result[f"{rule}_{key}"] = common.summary(row[rule][key] for row in per_seed)
    common.write_result(args.results, "asha_replay", result, args.quick)


if __name__ == "__main__":
    main()
