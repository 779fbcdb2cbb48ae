"""What a run returns: every failure with what was done about it (:class:`RecoveryRecord`),
the committed checkpoints and the events (:class:`RunResult`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .detect import Failure
from .events import Event
from .policy import HEAL, RESTARTED


@dataclass
class RecoveryRecord:
    """One failure and what was done about it."""

    failure: Failure
    at_s: float  # seconds since the job started, when it was detected
    action: str = ""
    policy: str | None = None  # the policy that acted: "reload", "heal" (auto says which it chose), ...
    world_before: int = 0
    world_after: int | None = None
    restore_step: int | None = None  # reload: the checkpoint's step; heal: the live step continued after
    # Tiers by their ckpt.restore.Tier value ("agent memory", "peer", "storage"), plain strings
    # because the result is printed and serialized; expected_tier may also be "mixed" or "none",
    # and "live" (recovery.restore.LIVE) for a heal: the bytes the ranks copied from a survivor.
    expected_tier: str | None = None
    restored_from: str | None = None  # the tier that served most bytes
    restore_bytes: dict[str, int] = field(default_factory=dict)  # per tier
    restore_s: float | None = None  # the slowest rank's restore
    fallbacks: list[dict[str, Any]] = field(default_factory=list)  # see restore_fallbacks
    resumed_after_s: float | None = None  # detection -> the new attempt's first step reached the coordinator (every rank's)
    steps_lost: int | None = None  # steps rolled back (0 for a heal, up to a step reported by a lost rank only)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["failure"] = self.failure.to_dict()
        return d


@dataclass
class RunResult:
    returns: list[Any]  # train_fn's return value per rank of the last attempt
    world_size: int
    attempts: int
    storage: str
    failures: list[RecoveryRecord]
    checkpoints: list[dict[str, Any]]  # committed checkpoints: step, stall_s (slowest rank), bytes, ...
    events: list[Event]
    elapsed_s: float
    restore_fallbacks: list[dict[str, Any]] = field(default_factory=list)  # of every attempt's restore

    def summary(self) -> str:
        """A few lines for people: checkpoints, stalls, failures and their recovery."""
        lines = []
        stalls = [c["stall_s"] for c in self.checkpoints if c.get("stall_s") is not None]
        steps = [c["step"] for c in self.checkpoints]
        lines.append(f"checkpoints committed: {len(steps)} (steps {_ranges(steps)})")
        if stalls:
            lines.append(f"training stall per checkpoint (slowest rank): mean {1e3 * sum(stalls) / len(stalls):.1f} ms, "
                         f"max {1e3 * max(stalls):.1f} ms")
        for i, r in enumerate(self.failures, 1):
            f = r.failure
            det = f"{f.detected_after_s:.2f} s" if f.detected_after_s is not None else "?"
            lines.append(f"failure {i}: {f.kind} ({f.detail}) at {r.at_s:.1f} s, detected {det} after the last "
                         "sign of progress")
            if r.action == RESTARTED and r.policy == HEAL:
                mb = sum(r.restore_bytes.values()) / 1e6
                resumed = f"{r.resumed_after_s:.1f} s" if r.resumed_after_s is not None else "?"
                lines.append(f"  healed: continued after step {r.restore_step} from a survivor's live state "
                             f"({mb:.1f} MB copied); workers {r.world_before} -> {r.world_after}; training resumed "
                             f"{resumed} after detection; steps lost: {r.steps_lost}")
            elif r.action == RESTARTED:
                src = r.restored_from or r.expected_tier or "?"
                mb = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in r.restore_bytes.items() if v)
                rs = f"{r.restore_s:.2f} s" if r.restore_s is not None else "?"
                resumed = f"{r.resumed_after_s:.1f} s" if r.resumed_after_s is not None else "?"
                lines.append(f"  {r.policy or 'reload'}: restored step {r.restore_step} from {src}{f' ({mb})' if mb else ''} in {rs}; "
                             f"workers {r.world_before} -> {r.world_after}; training resumed {resumed} after "
                             f"detection; steps lost: {r.steps_lost if r.steps_lost is not None else '?'}")
                lines += [f"  {describe_fallback(fb)}" for fb in r.fallbacks]
            else:
                lines.append(f"  {r.action}")
        lines.append(f"finished: {self.world_size} workers, {self.attempts} attempt(s), {self.elapsed_s:.1f} s")
        return "\n".join(lines)


def _ranges(steps: list[int]) -> str:
    if not steps:
        return "none"
    return ", ".join(str(s) for s in steps) if len(steps) <= 12 else f"{steps[0]} … {steps[-1]}"


def restore_fallbacks(reports: Mapping[int, Mapping[str, Any]], attempt: int) -> list[dict[str, Any]]:
    """The fallbacks the ranks' restore reports name (``ckpt.restore.Fallback.to_dict``), one per
    tier and reason: the attempt, the ranks, the first detail, and the chunks and bytes (per
    tier) then read instead, summed over the ranks."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for rank in sorted(reports):
        for f in reports[rank].get("fallbacks") or ():
            agg = out.setdefault((f["tier"], f["reason"]), {
                "attempt": attempt, "tier": f["tier"], "reason": f["reason"], "detail": f["detail"], "ranks": [],
                "chunks": 0, "bytes": {}})
            agg["ranks"].append(rank)
            agg["chunks"] += int(f.get("chunks", 0))
            for tier, n in (f.get("bytes") or {}).items():
                agg["bytes"][tier] = agg["bytes"].get(tier, 0) + int(n)
    return list(out.values())


def describe_fallback(fb: Mapping[str, Any]) -> str:
    instead = ", ".join(f"{v / 1e6:.1f} MB from {k}" for k, v in fb["bytes"].items() if v) or "nothing"
    return (f"{fb['tier']} fell back ({fb['reason']}) on rank(s) {_ranges(fb['ranks'])}: {fb['detail']}; "
            f"read instead: {instead}")
