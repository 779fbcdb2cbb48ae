"""The few collectives the synchronous ``save``/``load`` need, and their no-op single-process form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class Group:
    """A process group as seen by one member: its rank in the group, and the global ranks."""

    rank: int
    world: int
    global_rank: int
    global_ranks: tuple[int, ...]
    pg: Any = None

    @classmethod
    def resolve(cls, process_group: Any = None) -> Group:
        if isinstance(process_group, Group):  # a group described by hand (a rank saving alone)
            return process_group
        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise ValueError("process_group given but torch.distributed is not initialized")
            return cls(0, 1, 0, (0,), None)
        pg = process_group or dist.group.WORLD
        ranks = tuple(dist.get_process_group_ranks(pg))
        return cls(dist.get_rank(pg), len(ranks), dist.get_rank(), ranks, pg)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def broadcast(self, obj: Any) -> Any:
        """``obj`` of group rank 0, on every member."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.global_ranks[0], group=self.pg)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.pg)
