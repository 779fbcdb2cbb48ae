"""Policy ``heal``: recover a data-parallel job without rollback, and policy ``auto``, which
chooses between ``heal`` and ``reload`` for each failure and says why.

Heal: the surviving workers keep their processes *and* their live training state (model,
optimizer, step: what ``train_fn`` registered with ``ctx.resume``); a replacement starts for
each lost rank and copies the live state of one survivor over the new process group; the job
continues from the survivors' step, losing none. A replacement that does not start within
``placement_timeout_s`` is given up and the survivors continue without it (down to
``min_workers``), still without rollback.

The step in flight when the failure hit: every rank continues from the newest step a survivor
that stopped between steps had applied (``S``), and the ranks whose state is not at ``S`` (the
replacements, a survivor one step behind, a survivor stopped inside a step) copy the state of
the survivor chosen at ``S``. So a step applied by some survivor is kept (not redone) and one
that no survivor applied is redone from ``S + 1``; the ranks never diverge. Survivors more than
one step apart (not a lockstep job) or none stopped between steps: reload, and the event says why.

The decision is pure (:func:`decide_before_stop`, :func:`decide_heal`); the policies drive a
:class:`HealableJob` with it. A job that cannot heal (not a :class:`HealableJob`) is reloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from . import events as ev
from .detect import AGENT_DIED, FAILURE_KINDS, HANG, NODE_DIED, STORAGE, STRAGGLER, WORKER_DIED, WORKER_ERROR, Failure
from .live import LiveState
from .policy import (
    ABORT,
    CONTINUED,
    HEAL,
    RELOAD,
    RESTARTED,
    DataParallelJob,
    RecoveryOutcome,
    RecoveryPolicy,
    ReloadPolicy,
    grow_reason,
)


@runtime_checkable
class HealableJob(DataParallelJob, Protocol):
    """A data-parallel job whose workers can keep their live state (:class:`recovery.job.WorkerJob`)."""

    def stop_keeping_state(self, reason: str, *, grow: bool = False) -> dict[int, LiveState]:
        """Stop the attempt in place: kill what the failure took (``grow``: nothing), keep every
        other worker's process and live state; each kept survivor's :class:`LiveState` by rank."""

    def heal_workers(self, source: int, step: int, current: tuple[int, ...], *, grow_to: int | None = None) -> int:
        """Start the next attempt from rank ``source``'s live state at ``step`` (``current``:
        the ranks whose own state is at ``step``), ``grow_to`` ranks if given; without the
        replacements that do not start within ``placement_timeout_s``. Returns the world size;
        ``NoRoomError`` below ``min_workers``."""


@dataclass(frozen=True, slots=True)
class HealDecision:
    """What ``heal`` or ``auto`` chose for one failure, and a sentence for the event log."""

    policy: Literal["heal", "reload"]
    reason: str
    source: int | None = None  # heal: the rank whose live state the others copy
    step: int | None = None  # heal: the step every rank continues after
    current: tuple[int, ...] = field(default=())  # heal: ranks whose own state is at ``step``

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.policy, "reason": self.reason, "source": self.source, "step": self.step,
                "current": list(self.current)}


def lost_by(failure: Failure) -> set[int]:
    """The ranks whose processes the failure takes (a hang: its culprits)."""
    if failure.kind == HANG:
        return set(failure.culprits)
    return set(failure.ranks) if failure.kind in (WORKER_DIED, NODE_DIED, STRAGGLER) else set()


def decide_before_stop(failure: Failure, world_size: int, *, auto: bool) -> HealDecision | None:
    """A reload decided from the failure alone, or None: stop keeping state and look at the
    survivors (:func:`decide_heal`). ``auto``: policy auto's extra caution."""
    lost = lost_by(failure)
    if failure.kind not in FAILURE_KINDS:
        return HealDecision(RELOAD, f"reload: unknown failure kind {failure.kind!r}: nothing says which state survived")
    if lost and len(lost) >= world_size:
        return HealDecision(RELOAD, f"reload: every rank was lost ({failure.kind}): no live state survives")
    if not auto:
        return None
    if failure.kind == HANG and not failure.culprits:
        return HealDecision(RELOAD, "reload: a hang with no culprit told apart from the ranks waiting on it: "
                            "every rank's live state is doubtful")
    if failure.kind == HANG and len(failure.culprits) >= world_size:
        return HealDecision(RELOAD, "reload: every rank is a culprit of the hang")
    if failure.kind == WORKER_ERROR:
        return HealDecision(RELOAD, f"reload: train_fn raised on rank(s) {list(failure.ranks)}: its live state may be "
                            "torn mid-step, and the error may come from that state")
    return None


def decide_heal(live: Mapping[int, LiveState], world_size: int) -> HealDecision:
    """Heal from the survivors' ``live`` states (by rank), or reload, with the reason."""
    if not live:
        return HealDecision(RELOAD, "reload: no worker kept its process (a node loss with in_place=False, a "
                            "restart of everything, or no survivor stopped)")
    missing = sorted(r for r, s in live.items() if s.step is None)
    if missing:
        return HealDecision(RELOAD, f"reload: rank(s) {missing} hold no live state (train_fn does not call "
                            "ctx.resume(state)): nothing to heal from")
    clean = {r: s for r, s in live.items() if s.clean}
    if not clean:
        why = "; ".join(f"rank {r}: {s.why}" for r, s in sorted(live.items()))
        return HealDecision(RELOAD, f"reload: no survivor stopped between two steps ({why}): their state is doubtful")
    steps = sorted({s.step for s in clean.values() if s.step is not None})
    if steps[-1] - steps[0] > 1:
        at = {r: s.step for r, s in sorted(clean.items())}
        return HealDecision(RELOAD, f"reload: the survivors are at steps {at}, more than one step apart (a data-"
                            "parallel job's replicas move in lockstep): their states cannot be agreed on")
    step = steps[-1]
    current = tuple(sorted(r for r, s in clean.items() if s.step == step))
    source = current[0]
    behind = sorted(r for r, s in clean.items() if s.step != step)
    doubtful = sorted(r for r, s in live.items() if not s.clean)
    lost = world_size - len(live)
    parts = [f"heal: rank {source} at step {step} sends its live state to {lost} replacement(s)"]
    if behind:
        parts.append(f"rank(s) {behind} at step {step - 1} take step {step} from it (the step in flight was "
                     "applied on some ranks only: kept, not redone)")
    if doubtful:
        parts.append(f"rank(s) {doubtful} stopped mid-step take its state too")
    parts.append(f"every rank continues at step {step + 1}; 0 steps rolled back")
    return HealDecision(HEAL, "; ".join(parts), source, step, current)


class HealPolicy(RecoveryPolicy[DataParallelJob]):
    """``policy="heal"``: no rollback (see the module's docstring). Falls back to ``reload`` when
    no live state can be trusted, and says why (event ``restore_plan``, ``chosen``/``reason``)."""

    name = HEAL
    auto = False

    def on_failure(self, failure: Failure, job: DataParallelJob) -> RecoveryOutcome:
        if not isinstance(job, DataParallelJob):
            return RecoveryOutcome(ABORT, detail=f"policy {self.name!r} recovers a data-parallel job (recovery.run)")
        if failure.kind == STORAGE:
            job.log(ev.STORAGE, f"checkpoints keep failing ({failure.detail}); training goes on without them: "
                    "check the storage", detail=failure.detail)
            return RecoveryOutcome(CONTINUED, detail="storage failure: nothing to restart", policy=self.name)
        reason = f"{failure.kind}: {failure.detail}"
        decision = decide_before_stop(failure, job.world_size, auto=self.auto)
        if decision is None and not isinstance(job, HealableJob):
            decision = HealDecision(RELOAD, "reload: this job cannot keep its workers' live state")
        if decision is None:
            decision = decide_heal(job.stop_keeping_state(reason), job.world_size)
            if failure.kind == AGENT_DIED and decision.policy == HEAL:
                decision = HealDecision(HEAL, decision.reason.replace("heal:", "heal (no rank lost, the node agent "
                                        "restarts):", 1), decision.source, decision.step, decision.current)
        job.log(ev.RESTORE_PLAN, f"policy {self.name}: {decision.reason}", policy=self.name, **decision.to_dict())
        if decision.policy == RELOAD:
            out = ReloadPolicy.reload(job, job.config.num_workers, reason=reason)
            return RecoveryOutcome(out.action, out.world_size, out.restore, decision.reason, policy=RELOAD)
        assert isinstance(job, HealableJob) and decision.source is not None and decision.step is not None
        world = job.heal_workers(decision.source, decision.step, decision.current)
        fallback = getattr(job, "heal_fallback", None)
        if fallback is not None:  # a worker did not start: its live state went with it, all reloaded
            return RecoveryOutcome(RESTARTED, world, fallback, f"{decision.reason}; a worker did not start: every "
                                   f"worker reloaded step {fallback.step}", policy=RELOAD)
        return RecoveryOutcome(RESTARTED, world, None, decision.reason, policy=HEAL, live_step=decision.step)

    def on_checkpoint(self, step: int, job: DataParallelJob) -> RecoveryOutcome | None:
        """Grow back (``allow_grow``) once room returns: in place where the job has the bundles
        (a heal that shrank keeps them, or a group of their own is reserved for the new ranks):
        the survivors keep their processes, the new ranks copy a survivor's live state, nothing
        rolls back. Elsewhere by restarting every worker from that checkpoint."""
        want = job.config.num_workers
        if not job.config.allow_grow or job.world_size >= want:
            return None
        if not self._room_in_place(job, want):
            return ReloadPolicy.grow_by_restart(job, want, step)
        return self._grow_in_place(job, want, step)

    def on_progress(self, step: int, job: DataParallelJob) -> RecoveryOutcome | None:
        """Between checkpoints: grow back in place as soon as the new ranks are up (they copy a
        survivor's live state, so no checkpoint is waited for). The room is looked for at the
        checkpoints (:meth:`on_checkpoint`); here only while the new ranks' bundles are being
        placed or their processes boot ahead, so that a poll costs nothing otherwise."""
        want = job.config.num_workers
        if not job.config.allow_grow or job.world_size >= want or not getattr(job, "growth_under_way", False):
            return None
        return self._grow_in_place(job, want, step) if self._room_in_place(job, want) else None

    @staticmethod
    def _room_in_place(job: DataParallelJob, want: int) -> bool:
        """Whether ``job`` grows to ``want`` in place now; its new ranks boot ahead where that pays,
        the job growing at the first poll after they are up (``poll_interval_s``)."""
        room = getattr(job, "room_to_grow", None)
        return isinstance(job, HealableJob) and room is not None and bool(room(want, job.config.poll_interval_s))

    def _grow_in_place(self, job: DataParallelJob, want: int, step: int) -> RecoveryOutcome:
        assert isinstance(job, HealableJob)
        reason = grow_reason(job, want, step)
        decision = decide_heal(job.stop_keeping_state(reason, grow=True), want)
        job.log(ev.RESTORE_PLAN, f"policy {self.name}: {decision.reason}", policy=self.name, grow=True,
                **decision.to_dict())
        if decision.policy == RELOAD:
            out = ReloadPolicy.reload(job, want, reason=reason)
            return RecoveryOutcome(out.action, out.world_size, out.restore, decision.reason, policy=RELOAD)
        assert decision.source is not None and decision.step is not None
        world = job.heal_workers(decision.source, decision.step, decision.current, grow_to=want)
        if (fallback := getattr(job, "heal_fallback", None)) is not None:  # a worker did not start
            return RecoveryOutcome(RESTARTED, world, fallback, f"{decision.reason}; a worker did not start: every "
                                   f"worker reloaded step {fallback.step}", policy=RELOAD)
        return RecoveryOutcome(RESTARTED, world, None, decision.reason, policy=HEAL, live_step=decision.step)


class AutoHealPolicy(HealPolicy):
    """``policy="auto"`` of ``recovery.run``: ``heal`` where the survivors' live state can be
    trusted and the failure took processes, not the state (a lost process or node, an agent, a
    hang whose culprits are named, a straggler); ``reload`` where every rank is lost, where
    ``train_fn`` raised (the state itself may be at fault), on a hang with no culprit named,
    and wherever ``heal`` falls back. The choice and its reason are in the ``restore_plan``
    event (``chosen``, ``reason``), as for the pipelines' ``auto`` (reload or neighbour average)."""

    name = "auto"
    auto = True
