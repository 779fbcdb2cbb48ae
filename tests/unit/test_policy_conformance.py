"""The shipped recovery-policy conformance suite (``recovery.testing``) run against every
built-in policy: reload, heal and auto for data-parallel jobs, CheckFree's neighbour averaging
and auto for pipelines."""

from __future__ import annotations

import pytest

from recovery.checkfree import AutoPolicy, NeighborAveragePolicy
from recovery.detect import FAILURE_KINDS
from recovery.heal import AutoHealPolicy, HealPolicy
from recovery.policy import ABORT, RecoveryOutcome, ReloadPolicy
from recovery.testing import RecoveryPolicyTests


class TestReloadPolicy(RecoveryPolicyTests):
    def make_policy(self):
        return ReloadPolicy()


class TestNeighborAveragePolicy(RecoveryPolicyTests):
    def make_policy(self):
        return NeighborAveragePolicy()


class TestAutoPolicy(RecoveryPolicyTests):
    def make_policy(self):
        return AutoPolicy()


class TestHealPolicy(RecoveryPolicyTests):
    def make_policy(self):
        return HealPolicy()


class TestAutoHealPolicy(RecoveryPolicyTests):
    def make_policy(self):
        return AutoHealPolicy()


def test_the_suite_fails_a_policy_that_raises_or_gives_up_early():
    class Fragile(ReloadPolicy):
        def on_failure(self, failure, job):
            if failure.kind not in FAILURE_KINDS:
                raise KeyError(failure.kind)
            return super().on_failure(failure, job)

    class Impatient(ReloadPolicy):
        def on_failure(self, failure, job):
            return RecoveryOutcome(ABORT, detail="one failure is enough")

    suite = RecoveryPolicyTests()
    suite.make_policy = Fragile
    with pytest.raises(KeyError):
        suite.test_an_unknown_failure_kind_gets_an_answer_not_an_exception()
    suite.make_policy = Impatient
    with pytest.raises(AssertionError, match="gave up after 1"):
        suite.test_never_gives_up_before_max_failures()
