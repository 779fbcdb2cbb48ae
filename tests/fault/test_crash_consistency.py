"""SIGKILL the trainer, the node agent or both at random moments of saves (see crash_harness).

The default run is short; the 500-trial run is ``-m slow`` or
``python -m tests.fault.crash_trials --trials 500 --jobs 3 --seed 0`` (figures in RELIABILITY.md).
"""

from __future__ import annotations

import os
import sys

import pytest

from .crash_harness import VARIANTS, run_trials

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm") or not sys.platform.startswith("linux"),
                                reason="needs Linux POSIX shared memory (the node agent)")


def _check(figures: dict, trials: int) -> None:
    assert figures["failures"] == [], "\n\n".join(figures["failures"])
    assert figures["failed_trials"] == 0 and figures["lost_committed"] == 0
    assert figures["segments_left"] == 0
    assert figures["trials"] >= min(trials, 12)
    assert figures["kills_with_incomplete_step_left"] > 0  # kills did land in the middle of saves
    assert figures["committed_steps_checked"] >= figures["trials"]
    # a trainer whose node agent is killed keeps training (its checkpoints fail, reported)
    assert figures["training_went_on_after_agent_loss"] == figures["agent_loss_trials"]


def test_random_kills_during_saves_lose_nothing_committed():
    figures = run_trials(24, jobs=2, seed=0, max_seconds=150, max_delay_s=0.8)
    _check(figures, 24)
    assert set(figures["by_variant"]) == set(VARIANTS)


@pytest.mark.slow
def test_random_kills_during_saves_500_trials():
    figures = run_trials(500, jobs=3, seed=0, max_seconds=3600)
    _check(figures, 500)
    assert figures["trials"] == 500
