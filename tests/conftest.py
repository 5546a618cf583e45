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

    from rayfine.runtime import WORKER_ENV, local_ray, quiet_ray

    if ray.is_initialized():
        ray.shutdown()
    quiet_ray()
    with local_ray({"env_vars": dict(WORKER_ENV)}, num_cpus=2, logging_level="WARNING"):
        yield ray


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's real 8x8 digits as uint8 images and int labels."""
    from rayfine.data.sources import _builtin_digits

    return _builtin_digits()
