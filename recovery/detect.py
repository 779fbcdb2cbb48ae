"""Membership, heartbeats and failure detection: pure logic, driven by the coordinator with
its own clock (tests pass a fake one).

A worker's heartbeat carries its step and metrics (``ctx.report``); progress is a higher step
than before. A rank with no progress for ``hang_timeout_s`` (``startup_timeout_s`` before its
first report: process group set-up and restore) is hung. Process, node and agent deaths are
seen by the launcher from Ray at once; an agent that stops sending heartbeats for
``agent_timeout_s`` is reported here.

A heartbeat also carries the rank's compute timing (``recovery.worker.Reporter``): running
totals of compute sections and their seconds. :class:`StragglerDetector` turns them into each
rank's median compute time per section over ``straggler_window_s`` and reports the ranks at
least ``straggler_factor`` times slower than the median of their peers; the hang report uses
the section counts to tell the rank the others wait for from the ranks waiting for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import DetectConfig
from .stragglers import StragglerChange, StragglerDetector

# Failure kinds.
WORKER_DIED = "worker_died"  # the worker's process exited (Ray reports the actor dead)
WORKER_ERROR = "worker_error"  # train_fn raised
NODE_DIED = "node_died"
AGENT_DIED = "agent_died"
HANG = "hang"
STORAGE = "storage"
STRAGGLER = "straggler"  # a straggler for DetectConfig.replace_stragglers_after_s
FAILURE_KINDS = (WORKER_DIED, WORKER_ERROR, NODE_DIED, AGENT_DIED, HANG, STORAGE, STRAGGLER)


@dataclass(frozen=True, slots=True)
class Failure:
    """One failure. Times are wall-clock seconds (``time.time()``), comparable across the
    processes of one job."""

    kind: str
    attempt: int
    detail: str
    detected_at: float
    ranks: tuple[int, ...] = ()
    node: str | None = None
    last_progress_at: float | None = None  # the failed ranks' last sign of progress
    last_step: int | None = None  # the highest step any rank of the attempt reported
    culprits: tuple[int, ...] = ()  # a hang: the ranks the others wait for

    def __post_init__(self) -> None:
        if self.kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {self.kind!r}; known: {FAILURE_KINDS}")
        for name in ("ranks", "culprits"):  # rebuilt from to_dict() (lists): tuples again
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def detected_after_s(self) -> float | None:
        """From the last sign of progress of the failed ranks to the detection."""
        return None if self.last_progress_at is None else max(0.0, self.detected_at - self.last_progress_at)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "attempt": self.attempt, "detail": self.detail, "ranks": list(self.ranks),
                "node": self.node, "detected_at": self.detected_at, "last_progress_at": self.last_progress_at,
                "last_step": self.last_step, "detected_after_s": self.detected_after_s, "culprits": list(self.culprits)}


@dataclass(slots=True)
class RankState:
    rank: int
    started_at: float
    step: int | None = None
    progress_at: float | None = None  # when ``step`` last increased
    first_progress_at: float | None = None  # when the attempt's first step arrived (training resumed)
    seen_at: float | None = None  # last heartbeat of any kind
    metrics: dict[str, float] = field(default_factory=dict)
    node: str | None = None
    hung_reported: bool = False
    sections: int | None = None  # compute sections done (ctx.timed / ctx.compute_time), if measured

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "step": self.step, "progress_at": self.progress_at, "seen_at": self.seen_at,
                "first_progress_at": self.first_progress_at, "metrics": dict(self.metrics), "node": self.node,
                "sections": self.sections}


class Membership:
    """The workers of the current attempt and the node agents, with their heartbeats."""

    def __init__(self, config: DetectConfig) -> None:
        self.config = config
        self.attempt = -1
        self.world_size = 0
        self.ranks: dict[int, RankState] = {}
        self.agents: dict[str, float] = {}  # node -> last heartbeat
        self.agent_status: dict[str, dict[str, Any]] = {}
        self._agents_reported: set[str] = set()
        self.stragglers = self._straggler_detector(0)

    def begin_attempt(self, attempt: int, world_size: int, now: float) -> None:
        self.attempt = attempt
        self.world_size = world_size
        self.ranks = {r: RankState(r, now) for r in range(world_size)}
        self.stragglers = self._straggler_detector(world_size)

    def _straggler_detector(self, world_size: int) -> StragglerDetector:
        c = self.config
        return StragglerDetector(world_size, factor=c.straggler_factor, window_s=c.straggler_window_s,
                                 min_steps=c.straggler_min_steps, replace_after_s=c.replace_stragglers_after_s)

    def heartbeat(self, attempt: int, rank: int, world_size: int, step: int | None, metrics: Mapping[str, float],
                  now: float, node: str | None = None, timing: Sequence[Any] | None = None) -> bool:
        """Record a worker's heartbeat; False if it belongs to an older attempt. A heartbeat of a
        newer attempt than known (this coordinator restarted) adopts that attempt."""
        if attempt < self.attempt:
            return False
        if attempt > self.attempt or world_size != self.world_size:
            self.begin_attempt(attempt, world_size, now)
        st = self.ranks.get(rank)
        if st is None:
            return False
        st.seen_at = now
        st.node = node or st.node
        if step is not None and (st.step is None or step > st.step):
            st.step = step
            st.progress_at = now
            if st.first_progress_at is None:
                st.first_progress_at = now
        st.metrics.update({k: float(v) for k, v in metrics.items()})
        if timing is not None:
            sections, seconds, measured = int(timing[0]), float(timing[1]), bool(timing[2])
            st.sections = sections if measured else None
            self.stragglers.observe(rank, sections, seconds, measured)
        return True

    def agent_heartbeat(self, node: str, status: Mapping[str, Any], now: float) -> None:
        self.agents[node] = now
        self.agent_status[node] = dict(status)
        self._agents_reported.discard(node)

    def forget_agent(self, node: str) -> None:
        self.agents.pop(node, None)
        self.agent_status.pop(node, None)

    @property
    def last_step(self) -> int | None:
        steps = [s.step for s in self.ranks.values() if s.step is not None]
        return max(steps) if steps else None

    def check(self, now: float) -> list[Failure]:
        """Hangs of this attempt's ranks and silent agents, each reported once. O(ranks)."""
        out: list[Failure] = []
        hang, startup = self.config.hang_timeout_s, self.config.startup_timeout_for(self.world_size)
        hung = [st for st in self.ranks.values() if not st.hung_reported
                and now - (st.progress_at if st.progress_at is not None else st.started_at)
                > (hang if st.progress_at is not None else startup)]
        if hung:
            # The peers of a hung rank wait for it in a collective: every rank that has not
            # progressed for half the timeout goes in the same report, as a rank waiting.
            named = {st.rank for st in hung}
            hung += [st for st in self.ranks.values() if st.rank not in named and not st.hung_reported
                     and st.progress_at is not None and now - st.progress_at > hang / 2]
            hung.sort(key=lambda st: st.rank)
            for st in hung:
                st.hung_reported = True
            culprits = hang_culprits(hung)
            last = max(st.progress_at if st.progress_at is not None else st.started_at for st in hung)
            detail = _hang_detail(hung, culprits, now, self.config, startup)
            slow = [f"rank {st.rank} ({self.stragglers.ratio_of(st.rank):.1f}x its peers' compute time)"
                    for st in culprits[:8] if self.stragglers.is_straggler(st.rank)]
            if slow:
                detail += "; reported a straggler before: " + ", ".join(slow)
            out.append(Failure(HANG, self.attempt, detail, now,
                               ranks=tuple(st.rank for st in hung), last_progress_at=last, last_step=self.last_step,
                               culprits=tuple(st.rank for st in culprits)))
        for node, seen in self.agents.items():
            if node not in self._agents_reported and now - seen > self.config.agent_timeout_s:
                self._agents_reported.add(node)
                out.append(Failure(AGENT_DIED, self.attempt, f"the agent of node {node[:12]} sent no heartbeat for "
                                   f"{now - seen:.1f} s", now, node=node, last_progress_at=seen,
                                   last_step=self.last_step))
        return out

    def check_stragglers(self, now: float) -> tuple[list[StragglerChange], list[Failure]]:
        """Ranks that became stragglers or recovered, and the stragglers to replace. O(ranks)."""
        changes, replace = self.stragglers.check(now, lambda r: self.ranks[r].node if r in self.ranks else None)
        failures = [Failure(STRAGGLER, self.attempt, f"rank {c.rank} on node {(c.node or '?')[:12]} has been a straggler for "
                            f"{now - (c.since or now):.1f} s (replace_stragglers_after_s="
                            f"{self.config.replace_stragglers_after_s:g}): {c.describe()}", now, ranks=(c.rank,),
                            node=c.node, last_progress_at=self.ranks[c.rank].progress_at, last_step=self.last_step,
                            culprits=(c.rank,)) for c in replace]
        return changes, failures

    def progress(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "world_size": self.world_size, "last_step": self.last_step,
                "ranks": {r: s.to_dict() for r, s in self.ranks.items()}, "agents": dict(self.agent_status),
                "agents_seen_at": dict(self.agents), "stragglers": self.stragglers.current()}


def hang_culprits(hung: list[RankState]) -> list[RankState]:
    """The ranks the others wait for: those that never reported, else those furthest behind
    (the lowest step), among them those with the fewest compute sections done (where every one
    measures them), and among those the first to stop progressing (within a second). A
    collective hangs on its slowest member; its peers stop one step later, or at the same step
    with that step's compute done, or after it."""
    never = [st for st in hung if st.progress_at is None]
    if never:
        return never
    low = min(st.step for st in hung if st.step is not None)
    behind = [st for st in hung if st.step == low]
    if len(behind) > 1 and all(st.sections is not None for st in behind):
        # Compute sections (ctx.timed): a rank waiting in the step's collective has finished the
        # step's compute; the rank it waits for has not.
        least = min(st.sections for st in behind if st.sections is not None)
        behind = [st for st in behind if st.sections == least]
    first = min(st.progress_at for st in behind if st.progress_at is not None)
    return [st for st in behind if st.progress_at is not None and st.progress_at - first <= 1.0]


def _hang_detail(hung: list[RankState], culprits: list[RankState], now: float, config: DetectConfig,
                 startup_s: float) -> str:
    def one(st: RankState) -> str:
        if st.progress_at is None:
            return f"rank {st.rank} without a first report for {now - st.started_at:.1f} s"
        return f"rank {st.rank} stuck at step {st.step} for {now - st.progress_at:.1f} s"

    head = (f"no progress (hang_timeout_s={config.hang_timeout_s:g}, startup_timeout_s={startup_s:g} at this "
            "world size): "
            + ", ".join(one(st) for st in culprits[:8]) + (f" (+{len(culprits) - 8} more)" if len(culprits) > 8 else ""))
    blamed = {st.rank for st in culprits}
    waiting = [st for st in hung if st.rank not in blamed]
    if not waiting:
        return head
    steps = sorted({st.step for st in waiting if st.step is not None})
    shown = ", ".join(one(st) for st in waiting[:4]) + (", ..." if len(waiting) > 4 else "")
    return (f"{head}; {len(waiting)} rank(s) waiting behind it (at step {steps[0] if len(steps) == 1 else steps}): "
            f"{shown}")


def first_step_at(progress: Mapping[str, Any], now: float) -> float:
    """When the last rank's first step of an attempt reached the coordinator (each sends its first
    at once), from the coordinator's ``progress``; ``now`` if none has."""
    firsts = [r.get("first_progress_at") for r in progress.get("ranks", {}).values()]
    return max((t for t in firsts if t is not None), default=now)
