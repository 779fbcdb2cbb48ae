"""Ranks as threads of one process: a :class:`ckpt.dist.Group` whose one collective the
Checkpointer uses on save (a broadcast) goes through a barrier, so that tests and benchmarks can
run many writers of one checkpoint without a process group.

    groups = thread_groups(16)
    # in thread r: ckpt.Checkpointer(url, process_group=groups[r], ...)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from ..dist import Group


class _Hub:
    """What the ranks' broadcasts go through: rank 0's value, handed to every rank."""

    def __init__(self, world: int, timeout_s: float) -> None:
        self.barrier = threading.Barrier(world, timeout=timeout_s)
        self.value: Any = None


@dataclass(frozen=True, slots=True)
class ThreadGroup(Group):
    """One rank of a group of threads (``pg`` is None: no torch.distributed collective)."""

    hub: Any = None

    def broadcast(self, obj: Any) -> Any:
        if self.rank == 0:
            self.hub.value = obj
        self.hub.barrier.wait()
        value = self.hub.value
        self.hub.barrier.wait()  # nobody overwrites it before every rank has read it
        return value


def thread_groups(world: int, *, timeout_s: float = 300.0) -> list[ThreadGroup]:
    """The ``world`` members of one group of threads, by rank."""
    hub = _Hub(world, timeout_s)
    return [ThreadGroup(r, world, r, tuple(range(world)), None, hub) for r in range(world)]
