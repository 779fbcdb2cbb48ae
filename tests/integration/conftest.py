"""Fixtures of the integration tests: a local Ray cluster per test module (a module that needs
another cluster defines its own ``cluster``)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster per test module (2 CPUs, 4 "slot"s); no agent segment left after it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, resources={"slot": 4}, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    before = set(os.listdir("/dev/shm"))
    yield
    ray.shutdown()
    leaked = sorted(n for n in set(os.listdir("/dev/shm")) - before if n.startswith("ckrec"))
    assert not leaked, f"agent segments left behind: {leaked}"
