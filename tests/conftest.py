"""Session fixtures: the multi-rank harness (tests/distributed_harness.py) and the data
fixtures of tests/data_fixtures.py."""

from __future__ import annotations

import pytest

import distributed_harness
from data_fixtures import boltz_cache, guard_features, small_input, tiny_ckpt  # noqa: F401  (registers the fixtures)


@pytest.fixture(scope="session")
def run_on_mesh():
    """``run_on_mesh(fn, rows, cols, *args, timeout=60, **kwargs)`` -> results by rank."""
    return distributed_harness.run_on_mesh


@pytest.fixture(scope="session")
def run_on_world():
    """``run_on_world(fn, world_size, *args, timeout=60, **kwargs)`` -> results by rank."""
    return distributed_harness.run_on_world


def pytest_sessionfinish(session, exitstatus):
    distributed_harness.shutdown_pools()
