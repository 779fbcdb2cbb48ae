"""Many writer processes x many checkpoints on one machine: retention honoured, no leaked file
descriptors, threads or shared-memory segments (see load_harness). The 16 x 100 run is
``-m slow`` or ``python -m tests.fault.load_trials --writers 16 --checkpoints 100``."""

from __future__ import annotations

import os
import sys

import pytest

from .load_harness import run

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm") or not sys.platform.startswith("linux"),
                                reason="needs Linux (/proc, POSIX shared memory)")


def _check(out: dict, writers: int, checkpoints: int) -> None:
    assert out["exitcodes_nonzero"] == 0 and out["failed_checkpoints"] == 0, out["reports"]
    assert out["checkpoints_total"] == writers * checkpoints
    assert out["runs_with_retention_honoured"] == writers, out["runs"]
    assert out["fd_growth_second_lifetime"] == 0, out["reports"]
    assert out["threads_left_after_close"] == 0, out["reports"]
    # the agent holds the newest committed snapshot of each of its writers, then nothing
    assert out["segments_while_agent_runs"] <= out["agent_writers"]
    assert out["segments_after_agent_stops"] == 0 and out["agent_exit"] == 0


def test_4_writers_x_10_checkpoints(tmp_path):
    _check(run(4, 10, workdir=str(tmp_path)), 4, 10)


@pytest.mark.slow
def test_16_writers_x_100_checkpoints(tmp_path):
    _check(run(16, 100, workdir=str(tmp_path)), 16, 100)
