"""The recovery-policy conformance suite: what every :class:`recovery.policy.RecoveryPolicy`
must do, whatever it decides.

```python
from recovery.testing import RecoveryPolicyTests

class TestMyPolicy(RecoveryPolicyTests):
    def make_policy(self):
        return MyPolicy()
```

The suite drives the policy against a fake job of the policy's :attr:`job_kind` that records
what it was asked (:class:`FakeDataParallelJob`, :class:`FakePipelineJob`; override
:meth:`RecoveryPolicyTests.make_job` for another), and checks that the policy answers every
failure kind, and kinds it has never heard of, with an outcome instead of an exception; that
it refuses a job of the other kind with ``ABORT``; that it never gives up before the job's
``max_failures`` (the driver counts failures, not the policy); that a restart stays within
the job's world-size limits and resumes from the restore point it reports; and that restore
points carry :class:`ckpt.restore.Tier` values.

It lives in ``recovery`` rather than ``ckpt.testing``: ``ckpt`` never imports ``recovery``.
"""

from __future__ import annotations

from typing import Any

import pytest

from ckpt.restore import Tier

from .checkfree.plan import AutoInputs, plan_recovery
from .checkfree.policy import PipelineJob, StageRecoveryPolicy
from .config import RunConfig
from .detect import FAILURE_KINDS, NODE_DIED, WORKER_DIED, Failure
from .errors import NoRoomError
from .events import EventLog
from .live import LiveState
from .policy import ABORT, CONTINUED, RESTARTED, DataParallelJob, JobKind, RecoveryOutcome, RecoveryPolicy
from .restore import MIXED, NONE, RestorePoint

ACTIONS = (RESTARTED, CONTINUED, ABORT)


class FakeDataParallelJob(DataParallelJob):
    """A data-parallel job with room for ``room`` workers, whose restore point is ``point``;
    ``calls`` records each verb. It can heal (:class:`recovery.heal.HealableJob`): a stop keeps
    every rank but the last, each at step ``live_step``. ``fit_world`` raises ``NoRoomError`` below ``minimum``, as
    the real one does."""

    def __init__(self, config: RunConfig, *, room: int | None = None, point: RestorePoint | None = None,
                 world: int | None = None) -> None:
        self.config = config
        self.room = config.num_workers if room is None else room
        self.point = point if point is not None else RestorePoint(
            40, {"rank00000": Tier.AGENT_MEMORY, "rank00001": Tier.PEER, "rank00002": Tier.STORAGE})
        self._world = config.num_workers if world is None else world
        self._attempt = 0
        self.running = True
        self.calls: list[tuple[Any, ...]] = []
        self.events = EventLog(echo=None)

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def attempt(self) -> int:
        return self._attempt

    def log(self, kind: str, message: str, **fields: Any) -> None:
        self.events.emit(kind, message, **fields)

    def stop_workers(self, reason: str) -> None:
        self.calls.append(("stop", reason))
        self.running = False

    def find_restore_point(self) -> RestorePoint:
        self.calls.append(("find",))
        return self.point

    def fit_world(self, want: int, minimum: int) -> int:
        self.calls.append(("fit", want, minimum))
        if self.room < minimum:
            raise NoRoomError(f"room for {self.room} workers, fewer than {minimum}")
        return min(want, self.room)

    def room_for(self, n: int) -> bool:
        return self.room >= n

    def start_workers(self, world_size: int, restore: RestorePoint | None) -> None:
        self.calls.append(("start", world_size, restore))
        self._world = world_size
        self._attempt += 1
        self.running = True

    # -- recovery.heal.HealableJob: the last rank lost, the others kept, clean, at ``live_step`` ------

    live_step = 44
    grow_in_place = False  # its placement has (or reserves) free bundles: grow back keeping the workers
    growth_under_way = False  # the new ranks' bundles being placed or their processes booting ahead

    def room_to_grow(self, want: int, next_chance_s: float | None = None) -> bool:
        return self.grow_in_place and self.room >= want > self._world

    def grow_and_reload(self, want: int, reason: str) -> RestorePoint:
        """Grow back keeping every worker's process, all restoring the newest checkpoint."""
        self.calls.append(("stop", reason))
        self.calls.append(("find",))
        self.calls.append(("start", want, self.point))
        self._world = want
        self._attempt += 1
        self.running = True
        return self.point

    def stop_keeping_state(self, reason: str, *, grow: bool = False) -> dict[int, LiveState]:
        self.calls.append(("stop", reason))
        self.running = False
        kept = self._world if grow else self._world - 1
        return {r: LiveState(r, self.live_step, True, "stopped at a step boundary") for r in range(kept)}

    def heal_workers(self, source: int, step: int, current: tuple[int, ...], *, grow_to: int | None = None) -> int:
        world = min(grow_to or self._world, self.room)
        if world < self.config.min_workers:
            raise NoRoomError(f"room for {self.room} workers, fewer than {self.config.min_workers}")
        self.calls.append(("start", world, None))
        self.calls.append(("heal", world, source, step))
        self._world = world
        self._attempt += 1
        self.running = True
        return world


class FakePipelineJob(PipelineJob):
    """A pipeline of ``num_stages`` stages that plans each recovery like the real one and asks
    the policy to choose; ``calls`` records ``(lost, chosen)``."""

    def __init__(self, num_stages: int = 4, *, steps_since_snapshot: int | None = 10) -> None:
        self.num_stages = num_stages
        self.steps_since_snapshot = steps_since_snapshot
        self.calls: list[tuple[list[int], str]] = []

    def recover_stages(self, lost: list[int], policy: StageRecoveryPolicy) -> dict[str, Any]:
        plans = plan_recovery({s: 1 for s in lost if 0 <= s < self.num_stages}, num_stages=self.num_stages)
        inputs = AutoInputs(step_seconds=1.0, steps_since_snapshot=self.steps_since_snapshot, recovery_steps=50)
        chosen, reason = policy.choose(plans, inputs)
        self.calls.append((list(lost), chosen))
        return {"lost": list(lost), "chosen": chosen, "reason": reason, "plans": [p.to_dict() for p in plans]}


def failure(kind: str = WORKER_DIED, *, attempt: int = 0, ranks: tuple[int, ...] = (1,), node: str | None = None,
            last_step: int | None = 45) -> Failure:
    return Failure(kind, attempt, f"{kind} (injected by the conformance suite)", 1000.0, ranks=ranks, node=node,
                   last_progress_at=999.0, last_step=last_step)


def unknown_failure() -> Failure:
    """A failure of a kind this version does not know (a newer detector's)."""
    f = failure(WORKER_DIED)
    object.__setattr__(f, "kind", "meteor_strike")  # past the validation a Failure built here gets
    return f


class RecoveryPolicyTests:
    """Subclass and implement :meth:`make_policy`."""

    def make_policy(self) -> RecoveryPolicy:
        raise NotImplementedError

    def make_config(self, **overrides: Any) -> RunConfig:
        return RunConfig(**({"num_workers": 4, "storage": "memory://conformance", "min_workers": 2,
                             "max_failures": 3} | overrides))

    def make_job(self, policy: RecoveryPolicy, **config: Any) -> Any:
        """A fresh job of the policy's kind (``config``: :class:`RunConfig` fields)."""
        if policy.job_kind is JobKind.PIPELINE:
            return FakePipelineJob()
        return FakeDataParallelJob(self.make_config(**config))

    def check_outcome(self, policy: RecoveryPolicy, job: Any, outcome: Any) -> None:
        """What every answer must be, whatever was decided."""
        assert isinstance(outcome, RecoveryOutcome), f"{policy.name}: answered {outcome!r}, not a RecoveryOutcome"
        assert outcome.action in ACTIONS, f"{policy.name}: unknown action {outcome.action!r}"
        assert isinstance(outcome.detail, str)
        if outcome.restore is not None:
            self.check_restore_point(outcome.restore)
        if isinstance(job, FakeDataParallelJob):
            cfg = job.config
            if outcome.action == RESTARTED:
                starts = [c for c in job.calls if c[0] == "start"]
                assert starts, f"{policy.name}: restarted without starting workers"
                _, world, restore = starts[-1]
                assert cfg.min_workers <= world <= cfg.num_workers
                assert outcome.world_size in (None, world)
                if outcome.restore is not None:
                    assert restore is outcome.restore, "the workers resume from another point than the one reported"
                if outcome.live_step is not None:
                    heals = [c for c in job.calls if c[0] == "heal"]
                    assert heals and heals[-1][3] == outcome.live_step, "healed at another step than the one reported"
            if outcome.action != ABORT:
                assert job.running, f"{policy.name}: {outcome.action} but left the job without workers"

    def check_restore_point(self, point: Any) -> None:
        assert isinstance(point, RestorePoint)
        assert all(isinstance(t, Tier) for t in point.tiers.values()), point.tiers
        assert point.expected_tier in {t.value for t in Tier} | {MIXED, NONE}

    # -- the checks ---------------------------------------------------------------------------

    def test_has_a_name_and_a_job_kind(self):
        policy = self.make_policy()
        assert isinstance(policy, RecoveryPolicy)
        assert isinstance(policy.name, str) and policy.name
        assert isinstance(policy.job_kind, JobKind)
        assert policy.requires_pipeline == (policy.job_kind is JobKind.PIPELINE)

    @pytest.mark.parametrize("kind", FAILURE_KINDS)
    def test_decides_on_every_failure_kind(self, kind):
        policy = self.make_policy()
        job = self.make_job(policy)
        node = "node-a" if kind == NODE_DIED else None
        self.check_outcome(policy, job, policy.on_failure(failure(kind, node=node), job))

    def test_an_unknown_failure_kind_gets_an_answer_not_an_exception(self):
        policy = self.make_policy()
        job = self.make_job(policy)
        self.check_outcome(policy, job, policy.on_failure(unknown_failure(), job))

    def test_a_failure_that_names_nothing_gets_an_answer(self):
        policy = self.make_policy()
        job = self.make_job(policy)
        self.check_outcome(policy, job, policy.on_failure(failure(ranks=(), last_step=None), job))

    def test_a_job_of_the_other_kind_is_refused_with_abort(self):
        policy = self.make_policy()
        other = FakeDataParallelJob(self.make_config()) if policy.job_kind is JobKind.PIPELINE else FakePipelineJob()
        for job in (other, object()):
            out = policy.on_failure(failure(), job)
            assert out.action == ABORT and out.detail, f"{policy.name}: {out!r} for a {type(job).__name__}"

    def test_never_gives_up_before_max_failures(self):
        policy = self.make_policy()
        job = self.make_job(policy)
        limit = self.make_config().max_failures
        for attempt in range(limit):
            out = policy.on_failure(failure(attempt=attempt, ranks=(1 + attempt % 2,)), job)
            self.check_outcome(policy, job, out)
            assert out.action != ABORT, f"{policy.name} gave up after {attempt + 1} of max_failures={limit}: {out}"

    def test_restore_points_carry_tiers(self):
        policy = self.make_policy()
        job = self.make_job(policy)
        out = policy.on_failure(failure(), job)
        self.check_outcome(policy, job, out)
        if isinstance(job, FakeDataParallelJob) and out.action == RESTARTED:
            assert out.restore is not None or out.live_step is not None, \
                f"{policy.name}: restarted without saying from where (a checkpoint, or live state)"

    def test_no_room_is_a_no_room_error_or_abort(self):
        policy = self.make_policy()
        job = self.make_job(policy)
        if not isinstance(job, FakeDataParallelJob):
            pytest.skip("a pipeline job replaces stages in place: no placement to run out of")
        job.room = 1
        try:
            out = policy.on_failure(failure(), job)
        except NoRoomError:
            return
        assert out.action in (ABORT, CONTINUED), f"{policy.name}: {out.action} with no room for min_workers"

    def test_on_checkpoint_answers_nothing_or_an_outcome(self):
        policy = self.make_policy()
        jobs = [self.make_job(policy), self.make_job(policy, allow_grow=True)]
        if isinstance(jobs[1], FakeDataParallelJob):
            jobs[1]._world = jobs[1].config.min_workers  # shrunk earlier; room for all again now
        for job in jobs:
            out = policy.on_checkpoint(50, job)
            if out is not None:
                self.check_outcome(policy, job, out)

    def test_on_progress_answers_nothing_or_an_outcome(self):
        policy = self.make_policy()
        jobs = [self.make_job(policy), self.make_job(policy, allow_grow=True)]
        if isinstance(jobs[1], FakeDataParallelJob):
            jobs[1]._world = jobs[1].config.min_workers  # shrunk earlier; its new ranks up now
            jobs[1].grow_in_place = jobs[1].growth_under_way = True
        for job in jobs:
            out = policy.on_progress(47, job)
            if out is not None:
                self.check_outcome(policy, job, out)
