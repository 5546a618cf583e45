"""Shared fixtures. Tiers: unit tests need nothing; tests that use ``ray_local`` get one local Ray
per test module, stopped when the module ends; ``integration`` tests start what they need and stop it.

Two trained runs that several modules check or serve are trained once per session, in the Ray of
the first module that asks for them (``digits_run``, ``reviews_run``): their files outlive it.
A module that needs variables in its Ray's worker processes (which inherit them when Ray starts)
names them in a module-level ``RAY_ENV`` dict.
"""

from __future__ import annotations

import contextlib
import os
import sys
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class ModuleRay:
    """The running module's local Ray (2 CPUs): started by the first fixture that needs it (again
    if a test shut it down), stopped by ``stop`` when the module ends."""

    def __init__(self):
        self.stack: contextlib.ExitStack | None = None
        # Every collected module's RAY_ENV: a run trained for the session starts Ray before the
        # module's own fixtures run.
        self.env: dict[str, str] = {}

    def ensure(self):
        import ray

        from rayfine.runtime import WORKER_ENV, local_ray, quiet_ray

        if self.stack is not None and ray.is_initialized():
            return ray
        self.stop()
        if ray.is_initialized():  # a Ray some test started itself
            ray.shutdown()
        quiet_ray()
        with pytest.MonkeyPatch.context() as mp:  # the raylet, and so every worker, inherits them
            for name, value in self.env.items():
                mp.setenv(name, value)
            stack = contextlib.ExitStack()
            stack.enter_context(local_ray({"env_vars": dict(WORKER_ENV)}, num_cpus=2, logging_level="WARNING"))
        self.stack = stack
        return ray

    def stop(self):
        stack, self.stack = self.stack, None
        if stack is not None:
            stack.close()


RAY = ModuleRay()


# What runs in the Ray group: every test of these tiers, and any test using a fixture that starts Ray.
RAY_MARKS = ("ray", "integration", "bench")
RAY_FIXTURES = {"ray_local", "digits_run", "reviews_run"}


def uses_ray(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(mark) for mark in RAY_MARKS) or bool(RAY_FIXTURES & set(getattr(item, "fixturenames", ())))


def pytest_configure(config):
    """pytest 9.2 ignores the node id into which pytest-xdist 3.8 writes an item's group
    (pytest-xdist#1386): ``--dist loadgroup`` would then spread the Ray tests over both workers."""
    if config.getoption("dist", "no") == "loadgroup" and not hasattr(config, "workerinput"):
        import xdist
        from packaging.version import Version

        if Version(pytest.__version__) >= Version("9.2") and Version(xdist.__version__) < Version("3.9"):
            raise pytest.UsageError(f"pytest {pytest.__version__} breaks pytest-xdist {xdist.__version__}'s --dist loadgroup "
                                    "(pytest-xdist#1386): install the dev extra again (pyproject.toml pins pytest below 9.2)")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's hook, which names each item's group in its id
def pytest_collection_modifyitems(session, config, items):
    """Under ``make test`` (pytest-xdist, ``-n 2 --dist loadgroup``) every test that uses Ray is in
    one group, run in file order by one worker, so that one Ray at a time runs on the machine (two
    local clusters would want the same ports, and a second Ray makes Ray's address autodetection
    fail) and the session's trained runs are trained once; the unit tier is spread over both
    workers and runs beside it, on the CPU the Ray tests leave idle while they wait."""
    for item in items:
        RAY.env.update(getattr(getattr(item, "module", None), "RAY_ENV", {}))  # doctest items have none
        if uses_ray(item):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(autouse=True)
def _only_marked_tests_start_ray(request):
    """A test outside the Ray group that starts Ray in this process fails: under ``make test`` it
    would run beside the Ray group's Ray."""
    ray = sys.modules.get("ray")
    before = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    if not before and ray is not None and ray.is_initialized() and not uses_ray(request.node):
        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} started Ray but is not marked {' or '.join(RAY_MARKS)} "
                    f"and uses none of {sorted(RAY_FIXTURES)}: mark it")


@pytest.fixture(scope="module", autouse=True)
def _ray_stopped_when_the_module_ends():
    yield
    RAY.stop()


@pytest.fixture(scope="module")
def ray_local():
    """The module's local Ray (the ``ray`` module), running."""
    return RAY.ensure()


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's real 8x8 digits as uint8 images and int labels."""
    from rayfine.data.sources import _builtin_digits

    return _builtin_digits()


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """One real 3-epoch run of resnet18_digits_tiny on 2 DDP workers, tracked in MLflow:
    test_train checks what it wrote, test_serve serves its epoch-2 and epoch-3 checkpoints (all
    three are kept: which two are the best by validation accuracy differs between CPU kinds).
    Batch 34: each worker's 239 rows end in a batch of one example, which BatchNorm cannot train
    on (the ResNet's last feature map is 1x1 at 8 px); it is left out (train_batches)."""
    from rayfine.config import load_config
    from rayfine.train import fit

    RAY.ensure()
    root = tmp_path_factory.mktemp("digits_run")
    mlflow_uri = f"sqlite:///{root}/mlflow.db"
    cfg = load_config("resnet18_digits_tiny", ["name=digits", f"storage.runs_dir={root}", "train.epochs=3",
                                               "train.keep_checkpoints=3", "train.batch_size=34", f"tracking.mlflow.tracking_uri={mlflow_uri}"])
    summary = fit(cfg, log=lambda *_: None)
    return SimpleNamespace(cfg=cfg, summary=summary, dir=root / "digits", mlflow_uri=mlflow_uri)


@pytest.fixture(scope="session")
def reviews():
    """1,300 real Rotten Tomatoes review snippets (every 9th, so both labels and many films are in)."""
    import pandas as pd

    from rayfine.data.sources import _builtin_rotten_tomatoes

    texts, labels = _builtin_rotten_tomatoes()
    return pd.DataFrame({"text": texts[::9][:1300], "label": labels[::9][:1300]})


@pytest.fixture(scope="session")
def reviews_run(reviews, tmp_path_factory):
    """minilm_rotten_tomatoes_tiny fine-tuned on a user's CSV of ``reviews`` (2 DDP workers,
    1 epoch): test_text checks what it learnt, test_serve_text serves it. One epoch already learns:
    test accuracy 0.69, where test_text wants the majority label's share (0.58) + 0.05; a second
    epoch took ~45 s more."""
    from rayfine.config import load_config
    from rayfine.train import fit

    RAY.ensure()
    root = tmp_path_factory.mktemp("reviews_run")
    reviews.to_csv(root / "reviews.csv", index=False)
    cfg = load_config("minilm_rotten_tomatoes_tiny", [f"data.source={root / 'reviews.csv'}", "data.subsample=1.0",
                                                      "train.epochs=1", f"storage.runs_dir={root / 'runs'}"])
    summary = fit(cfg, log=lambda *_: None)
    return SimpleNamespace(cfg=cfg, summary=summary, checkpoint=root / "runs" / cfg.name / "train" / "checkpoint")
