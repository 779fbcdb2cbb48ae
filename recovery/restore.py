"""Where a restarted job resumes, and which tier is expected to serve each writer's bytes.

The tiers are :class:`ckpt.restore.Tier` (agent memory, peer, storage): the same values name
what a restore was planned to read here, and what it did read (the workers report the bytes
each tier of their restore chain served).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ckpt.restore import Tier

MIXED = "mixed"  # writers' bytes expected from more than one tier
NONE = "none"  # nothing to restore: the job starts from scratch
LIVE = "live"  # policy heal: no checkpoint read, the ranks copied a survivor's live state


@dataclass(frozen=True, slots=True)
class RestorePoint:
    """The newest committed step (``None``: from scratch) and, per writer of that step, the
    tier expected to serve its bytes: :attr:`Tier.AGENT_MEMORY` (an agent holds its own
    snapshot), :attr:`Tier.PEER` (an agent holds a replica) or :attr:`Tier.STORAGE`."""

    step: int | None
    tiers: Mapping[str, Tier] = field(default_factory=dict)
    completed: tuple[int, ...] = ()  # steps committed while choosing (persisted but not yet committed)
    # Writer -> the replication addresses of the agents holding its committed snapshot of the
    # step: the directory a restoring agent asks instead of the whole ring. None: not known
    # (agents outside the job, or none), the agents then ask every agent of the ring.
    holders: Mapping[str, tuple[str, ...]] | None = None

    def __post_init__(self) -> None:
        for writer, tier in self.tiers.items():
            if not isinstance(tier, Tier):
                raise TypeError(f"RestorePoint.tiers[{writer!r}] must be a ckpt.restore.Tier, got {tier!r}")

    @property
    def expected_tier(self) -> str:
        """For people and the run's record: the one tier's value, ``"mixed"``, or ``"none"``."""
        if self.step is None:
            return NONE
        kinds = set(self.tiers.values())
        if not kinds:
            return Tier.STORAGE.value
        return kinds.pop().value if len(kinds) == 1 else MIXED


def writer_tiers(writers: Iterable[str], held: set[tuple[str, bool]]) -> dict[str, Tier]:
    """The tier expected to serve each writer, from what the agents hold of the step:
    ``(writer, replica)`` pairs of committed snapshots."""
    return {w: Tier.AGENT_MEMORY if (w, False) in held else Tier.PEER if (w, True) in held else Tier.STORAGE
            for w in writers}


def of_the_save(row: Mapping, step: int, save_id: str | None) -> bool:
    """Whether an agent's listing ``row`` holds a usable snapshot of ``step`` as committed by
    ``save_id``: any state but failed. A replica whose origin's node was lost before it heard of
    the commit stays persisted until its agent takes it over, yet it holds the committed bytes
    (a restore checks the save against the commit point before it reads). Without ``save_id``
    (an older caller), only snapshots the agent saw committed count."""
    if row["step"] != step:
        return False
    if save_id is None or "save_id" not in row:
        return row["state"] == "committed"
    return row["save_id"] == save_id and row["state"] != "failed"


def holders_of(step: int, rows: Iterable[Mapping], peer: Mapping[str, str],
               save_id: str | None = None) -> dict[str, tuple[str, ...]]:
    """Writer -> the addresses (``peer``: node -> the node's agent's replication address) of the
    agents whose listing ``rows`` (with their ``node``) hold a snapshot of ``step`` from the save
    that committed it (:func:`of_the_save`)."""
    out: dict[str, set[str]] = {}
    for r in rows:
        address = peer.get(r["node"])
        if address and of_the_save(r, step, save_id):
            out.setdefault(r["writer"], set()).add(address)
    return {w: tuple(sorted(a)) for w, a in out.items()}
