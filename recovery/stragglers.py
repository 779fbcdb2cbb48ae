"""Stragglers: ranks that compute slower than their peers, found from the compute timing their
heartbeats carry (``recovery.worker.Reporter``: running totals of compute sections and their
seconds). Pure logic on the coordinator's clock, driven by :class:`recovery.detect.Membership`;
docs/recovery.md, "Stragglers", says why compute time and not step time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


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

    A heartbeat only stores the rank's running totals (a few microseconds less per heartbeat than
    numpy would take); each round folds what arrived since the last one into the current time
    bucket, vectorized: the sections and seconds since the rank's totals of the round before.
    The window is ``BUCKETS`` buckets of ``straggler_window_s / BUCKETS``, one row per rank, so
    memory and a round's work are O(ranks x BUCKETS) whatever the heartbeat rate. A round takes each rank's median over its
    buckets' means (a bucket that held a pause, a checkpoint or a collection does not move it),
    the median of the OTHER ranks' medians for each rank (one sort: O(N log N)), and reports a
    rank whose ratio reaches ``straggler_factor``, once it was measured for a whole window with
    ``straggler_min_steps`` sections in it; it recovers below ``factor - (factor - 1) / 4`` (a
    rank at the edge does not flap). Ranks measured differently (compute sections vs the time
    between reports) are compared as they are: a job measures one way everywhere.
    ``work`` counts the cells a round touched: the test of O(N) rounds reads it."""

    BUCKETS = 16

    def __init__(self, world_size: int, *, factor: float, window_s: float, min_steps: int,
                 replace_after_s: float | None = None) -> None:
        # DetectConfig's straggler_* fields (this module sits below the configuration's users)
        self.factor, self.window_s, self.min_steps, self.replace_after_s = factor, window_s, min_steps, replace_after_s
        n, b = world_size, self.BUCKETS
        self.span = window_s / b
        self.count = np.zeros((n, b))
        self.seconds = np.zeros((n, b))
        self.bucket = np.full(b, -(2**62), dtype=np.int64)  # the bucket number each column holds now
        self.total = np.full((n, 2), np.nan)  # the rank's last running totals: sections, seconds
        self.measured = np.zeros(n, dtype=bool)
        self.first_at = np.full(n, np.inf)  # when its totals were first seen (its window fills from then)
        self.slow_since = np.full(n, np.nan)  # NaN: not a straggler
        self.ratio = np.full(n, np.nan)
        self.replaced = np.zeros(n, dtype=bool)
        self._sections: list[float] = [float("nan")] * n  # the latest totals heard, folded in each round
        self._seconds: list[float] = [0.0] * n
        self._measured: list[bool] = [False] * n
        self.work = 0

    def observe(self, rank: int, sections: int, seconds: float, measured: bool) -> None:
        """A heartbeat's totals: kept until the next round (O(1), a few list stores)."""
        if 0 <= rank < len(self._sections):
            self._sections[rank], self._seconds[rank], self._measured[rank] = sections, seconds, measured

    def _fold(self, now: float) -> None:
        """The totals that arrived since the last round, as one sample per rank into the current
        bucket: vectorized, O(ranks) a round."""
        sections = np.array(self._sections, dtype=float)
        seconds = np.array(self._seconds, dtype=float)
        measured = np.array(self._measured, dtype=bool)
        last_sections, last_seconds = self.total[:, 0], self.total[:, 1]
        seen = ~np.isnan(sections)
        with np.errstate(invalid="ignore"):
            # first seen, a new process, or compute time from now on: measuring starts over
            reset = seen & (np.isnan(last_sections) | (sections < last_sections) | (measured != self.measured))
            done = np.where(seen & ~reset, sections - last_sections, 0.0)
        if reset.any():
            self.count[reset] = 0.0
            self.seconds[reset] = 0.0
            self.first_at[reset] = now
            self.measured[reset] = measured[reset]
        if (done > 0).any():
            b = int(now // self.span)
            col = b % self.BUCKETS
            if self.bucket[col] != b:
                self.count[:, col] = 0.0
                self.seconds[:, col] = 0.0
                self.bucket[col] = b
            self.count[:, col] += np.maximum(done, 0.0)
            self.seconds[:, col] += np.where(done > 0, np.maximum(seconds - last_seconds, 0.0), 0.0)
        self.total[seen, 0] = sections[seen]
        self.total[seen, 1] = seconds[seen]

    def check(self, now: float, node_of: Callable[[int], str | None]) -> tuple[list[StragglerChange],
                                                                             list[StragglerChange]]:
        """The ranks that became stragglers or recovered since the last round, and the stragglers
        due for replacement (each once)."""
        n = len(self.total)
        if n < 2:
            return [], []
        self._fold(now)
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
        eligible = (steps >= self.min_steps) & (self.first_at <= now - self.window_s) \
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
        factor = self.factor
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
        after = self.replace_after_s
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
