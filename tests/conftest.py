"""Shared fixtures. Tiers: unit tests need nothing; modules marked ``ray`` share one local Ray
per module (``ray_local``); ``integration`` tests start what they need and stop it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray (2 CPUs) for one test module, stopped when the module ends."""
    import ray

    from rayfine.runtime import WORKER_ENV, quiet_ray

    if ray.is_initialized():
        ray.shutdown()
    quiet_ray()
    ray.init(address="local", num_cpus=2, runtime_env={"env_vars": dict(WORKER_ENV)}, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's real 8x8 digits as uint8 images and int labels."""
    from rayfine.data.sources import _builtin_digits

    return _builtin_digits()
