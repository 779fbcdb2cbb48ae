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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import DetectConfig

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
    seen_at: float | None = None  # last heartbeat of any kind
    metrics: dict[str, float] = field(default_factory=dict)
    node: str | None = None
    hung_reported: bool = False
    sections: int | None = None  # compute sections done (ctx.timed / ctx.compute_time), if measured

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "step": self.step, "progress_at": self.progress_at, "seen_at": self.seen_at,
                "metrics": dict(self.metrics), "node": self.node, "sections": self.sections}


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
        self.stragglers = StragglerDetector(config, 0)

    def begin_attempt(self, attempt: int, world_size: int, now: float) -> None:
        self.attempt = attempt
        self.world_size = world_size
        self.ranks = {r: RankState(r, now) for r in range(world_size)}
        self.stragglers = StragglerDetector(self.config, world_size)

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
        st.metrics.update({k: float(v) for k, v in metrics.items()})
        if timing is not None:
            sections, seconds, measured = int(timing[0]), float(timing[1]), bool(timing[2])
            st.sections = sections if measured else None
            self.stragglers.observe(rank, sections, seconds, measured, now)
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
        hang, startup = self.config.hang_timeout_s, self.config.startup_timeout_s
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
            detail = _hang_detail(hung, culprits, now, self.config)
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


def _hang_detail(hung: list[RankState], culprits: list[RankState], now: float, config: DetectConfig) -> str:
    def one(st: RankState) -> str:
        if st.progress_at is None:
            return f"rank {st.rank} without a first report for {now - st.started_at:.1f} s"
        return f"rank {st.rank} stuck at step {st.step} for {now - st.progress_at:.1f} s"

    head = (f"no progress (hang_timeout_s={config.hang_timeout_s:g}, startup_timeout_s={config.startup_timeout_s:g}): "
            + ", ".join(one(st) for st in culprits[:8]) + (f" (+{len(culprits) - 8} more)" if len(culprits) > 8 else ""))
    blamed = {st.rank for st in culprits}
    waiting = [st for st in hung if st.rank not in blamed]
    if not waiting:
        return head
    steps = sorted({st.step for st in waiting if st.step is not None})
    shown = ", ".join(one(st) for st in waiting[:4]) + (", ..." if len(waiting) > 4 else "")
    return (f"{head}; {len(waiting)} rank(s) waiting behind it (at step {steps[0] if len(steps) == 1 else steps}): "
            f"{shown}")


# -- stragglers -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StragglerChange:
    """A rank became a straggler (``slow``) or stopped being one. Times: the coordinator's clock."""

    rank: int
    node: str | None
    slow: bool
    step_time_s: float  # the rank's median compute time per section over the window
    peers_s: float  # the median of the other ranks' medians
    factor: float  # step_time_s / peers_s
    steps: int  # sections measured in the window
    measured: bool  # compute time (ctx.timed / ctx.compute_time), else the time between reports
    at: float
    since: float | None = None  # when it became a straggler

    def describe(self) -> str:
        what = "compute time" if self.measured else "time between reports"
        return (f"{what} {self.step_time_s * 1e3:.1f} ms per step, {self.factor:.2f}x its peers' median "
                f"{self.peers_s * 1e3:.1f} ms ({self.steps} steps in the window)")

    def to_fields(self) -> dict[str, Any]:
        return {"rank": self.rank, "node": self.node, "state": "slow" if self.slow else "recovered",
                "step_time_s": round(self.step_time_s, 6), "peers_s": round(self.peers_s, 6),
                "factor": round(self.factor, 3), "steps": self.steps,
                "signal": "compute" if self.measured else "step", "detected_at": self.at, "since": self.since}


class StragglerDetector:
    """Each rank's median compute time per section over the window against its peers'.

    A heartbeat's running totals become a sample (sections and seconds since the rank's previous
    heartbeat that arrived), added to the current time bucket: the window is ``BUCKETS`` buckets
    of ``straggler_window_s / BUCKETS``, one row per rank, so memory and a round's work are
    O(ranks x BUCKETS) whatever the heartbeat rate. A round takes each rank's median over its
    buckets' means (a bucket that held a pause, a checkpoint or a collection does not move it),
    the median of the OTHER ranks' medians for each rank (one sort: O(N log N)), and reports a
    rank whose ratio reaches ``straggler_factor``, once it was measured for a whole window with
    ``straggler_min_steps`` sections in it; it recovers below ``factor - (factor - 1) / 4`` (a
    rank at the edge does not flap). Ranks measured differently (compute sections vs the time
    between reports) are compared as they are: a job measures one way everywhere.
    ``work`` counts the cells a round touched: the test of O(N) rounds reads it."""

    BUCKETS = 16

    def __init__(self, config: DetectConfig, world_size: int) -> None:
        self.config = config
        n, b = world_size, self.BUCKETS
        self.span = config.straggler_window_s / b
        self.count = np.zeros((n, b))
        self.seconds = np.zeros((n, b))
        self.bucket = np.full(b, -(2**62), dtype=np.int64)  # the bucket number each column holds now
        self.total = np.full((n, 2), np.nan)  # the rank's last running totals: sections, seconds
        self.measured = np.zeros(n, dtype=bool)
        self.first_at = np.full(n, np.inf)  # when its totals were first seen (its window fills from then)
        self.slow_since = np.full(n, np.nan)  # NaN: not a straggler
        self.ratio = np.full(n, np.nan)
        self.replaced = np.zeros(n, dtype=bool)
        self.work = 0

    def observe(self, rank: int, sections: int, seconds: float, measured: bool, now: float) -> None:
        """A heartbeat's totals. O(1), and O(ranks) once per bucket (a column reused)."""
        if not 0 <= rank < len(self.total):
            return
        last_sections, last_seconds = self.total[rank]
        self.total[rank] = (sections, seconds)
        if np.isnan(last_sections) or sections < last_sections or measured != self.measured[rank]:
            # first seen, a new process, or compute time from now on: measuring starts over
            self.measured[rank] = measured
            self.count[rank] = 0.0
            self.seconds[rank] = 0.0
            self.first_at[rank] = now
            return
        done = sections - last_sections
        if done <= 0:
            return
        b = int(now // self.span)
        col = b % self.BUCKETS
        if self.bucket[col] != b:
            self.count[:, col] = 0.0
            self.seconds[:, col] = 0.0
            self.bucket[col] = b
        self.count[rank, col] += done
        self.seconds[rank, col] += max(0.0, seconds - last_seconds)

    def check(self, now: float, node_of: Callable[[int], str | None]) -> tuple[list[StragglerChange],
                                                                             list[StragglerChange]]:
        """The ranks that became stragglers or recovered since the last round, and the stragglers
        due for replacement (each once)."""
        n = len(self.total)
        if n < 2:
            return [], []
        cfg = self.config
        b = int(now // self.span)
        live = (self.bucket > b - self.BUCKETS) & (self.bucket <= b)
        count, seconds = self.count[:, live], self.seconds[:, live]
        if count.shape[1] == 0:
            return [], []
        steps = count.sum(axis=1)
        filled = (count > 0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.sort(np.where(count > 0, seconds / count, np.nan), axis=1)  # no sample: NaN, sorted last
        rows, lo, hi = np.arange(n), np.maximum(filled - 1, 0) // 2, filled // 2
        median = np.where(filled > 0, (means[rows, lo] + means[rows, np.minimum(hi, count.shape[1] - 1)]) / 2, np.nan)
        eligible = (steps >= cfg.straggler_min_steps) & (self.first_at <= now - cfg.straggler_window_s) \
            & ~np.isnan(median)
        idx = np.flatnonzero(eligible)
        self.work = 3 * n * int(live.sum()) + n + len(idx)
        k = len(idx)
        if k < 2:
            return [], []
        values = median[idx]
        order = np.argsort(values, kind="stable")
        srt = values[order]
        pos = np.empty(k, dtype=np.int64)
        pos[order] = np.arange(k)

        def other(j: int) -> np.ndarray:  # the j-th smallest of the other ranks' medians, per rank
            return np.where(j < pos, srt[j], srt[min(j + 1, k - 1)])

        m = k - 1
        peers = other(m // 2) if m % 2 else (other(m // 2 - 1) + other(m // 2)) / 2
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(peers > 0, values / peers, np.nan)
        self.ratio[idx] = ratio  # the last known ratio of the others stays
        was = ~np.isnan(self.slow_since[idx])
        factor = cfg.straggler_factor
        became = ~was & (ratio >= factor)
        recovered = was & (ratio < factor - (factor - 1) / 4)
        changes = []
        for i in np.flatnonzero(became | recovered):
            r = int(idx[i])
            slow = bool(became[i])
            since = now if slow else float(self.slow_since[r])
            self.slow_since[r] = now if slow else np.nan
            changes.append(StragglerChange(r, node_of(r), slow, float(values[i]), float(peers[i]), float(ratio[i]),
                                           int(steps[r]), bool(self.measured[r]), now, since))
        replace = []
        after = cfg.replace_stragglers_after_s
        if after is not None:
            due = np.flatnonzero(~np.isnan(self.slow_since) & (now - self.slow_since >= after) & ~self.replaced)
            for r in due:
                self.replaced[r] = True
                i = int(np.searchsorted(idx, r))
                known = i < k and idx[i] == r
                replace.append(StragglerChange(int(r), node_of(int(r)), True,
                                               float(values[i]) if known else float("nan"),
                                               float(peers[i]) if known else float("nan"),
                                               float(self.ratio[r]), int(steps[r]), bool(self.measured[r]), now,
                                               float(self.slow_since[r])))
        return changes, replace

    def is_straggler(self, rank: int) -> bool:
        return 0 <= rank < len(self.slow_since) and not np.isnan(self.slow_since[rank])

    def ratio_of(self, rank: int) -> float:
        return float(self.ratio[rank]) if 0 <= rank < len(self.ratio) else float("nan")

    def current(self) -> dict[int, float]:
        """The stragglers now: rank -> its ratio to its peers."""
        return {int(r): round(float(self.ratio[r]), 3) for r in np.flatnonzero(~np.isnan(self.slow_since))}
