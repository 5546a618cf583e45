"""The ASHA hyperparameter search: one Ray Tune trial = one Ray Train run from ``build_trainer``.

    rayfine tune resnet18_digits --set tune.num_samples=16
    rayfine tune my.yaml --resume                  # continue a search whose driver was killed

    from rayfine.tune import run_search            # inside rayfine.runtime.ray_session()
    summary = run_search(load_config("resnet18_digits_tiny"))

Modules, in the order a search runs:
- ``plan``: what one trial holds (trial actor + training workers + CPUs for Ray Data), how many
  trials fit at once, and a refusal naming the fields to change when none fits.
- ``trial``: the search space as Tune domains; ``run_trial``, the Tune function trainable that
  builds the trial's config and its TorchTrainer (with ``TuneReportCallback``) and fits it.
- ``progress``: the live table of trials and the leaderboard.
- ``halving``: synchronous successive halving (``tune.scheduler: halving``), a Tune scheduler that
  pauses trials at each rung until all have reached it, and the searcher that gives it its slots.
- ``search``: ``run_search`` (new or resumed Tuner, ASHA or halving keyed on the reported epoch) and the
  run directory's tune/: trials.csv, summary.json, best/{checkpoint/, eval.json, config.yaml}.
"""

from rayfine.tune.plan import ResourcePlan, count_trials, plan_resources

__all__ = ["ResourcePlan", "count_trials", "plan_resources", "run_search"]


def __getattr__(name: str):
    # run_search pulls in Ray Tune and torch; import it only when asked for.
    if name == "run_search":
        from rayfine.tune.search import run_search

        return run_search
    raise AttributeError(name)
