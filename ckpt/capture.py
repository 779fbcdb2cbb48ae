"""Capture: what ``Checkpointer.save`` knows of a state before it copies anything. A plan of the
save built once and reused while the tensors stay the same (same memory, shape, layout), with
the host views of each slab and the write requests that read them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .hostpool import aligned
from .layout import Sharded, is_dtensor, layout_of
from .plan import SavePlan, TensorItem, plan_items
from .planning import WriteRequest


def storage_ptr(t: torch.Tensor) -> int:
    if is_dtensor(t):
        t = t.to_local()
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # tensors without storage (meta, some subclasses): never lazy
        return 0


def local_tensor(leaf: Any) -> torch.Tensor:
    if isinstance(leaf, Sharded):
        return leaf.tensor
    if is_dtensor(leaf):
        return leaf.to_local()
    return leaf


def leaf_key(path: str, leaf: Any) -> tuple:
    """What a tensor leaf's plan depends on: where it is, its memory, shape, layout."""
    if isinstance(leaf, Sharded):
        t, extra = leaf.tensor, (leaf.dim, leaf.rank, leaf.world, leaf.parts, leaf.logical_size, leaf.replica,
                                 leaf.average)
    elif is_dtensor(leaf):
        t, extra = leaf._local_tensor, (tuple(leaf.shape), tuple(leaf.placements), id(leaf.device_mesh))
    else:
        t, extra = leaf, None
    try:
        ptr = t.data_ptr()
    except RuntimeError:
        ptr = 0
    return (path, type(leaf), ptr, t.dtype, tuple(t.shape), t.stride(), t.device, extra)


@dataclass(eq=False)
class CapturePlan:
    """The save plan of one set of tensors, reused while the tensors stay the same."""

    key: tuple
    items: list[TensorItem]
    plan: SavePlan
    mine_idx: list[int]  # the tensors (indices into ``items``) this process writes
    request_items: list[int]  # per write request of ``plan``: its index into ``mine_idx``
    nbytes: int
    _memo: dict[int, tuple[Any, list[torch.Tensor], list[Any]]] = field(default_factory=dict)

    @classmethod
    def build(cls, key: tuple, leaves: list[tuple[str, Any, bool]], values: dict[str, Any], *,
              rank: int, world: int, max_chunk_bytes: int, containers: dict[str, Any] | None = None) -> CapturePlan:
        items = [TensorItem(path, *layout_of(leaf, rank=rank, world=world)) for path, leaf, is_tensor in leaves
                 if is_tensor]
        plan = replace(plan_items(items, values, max_chunk_bytes=max_chunk_bytes), containers=containers or {})
        written = {id(r.tensor) for r in plan.requests}
        mine_idx = [i for i, it in enumerate(items) if id(it.tensor) in written]
        position = {id(items[i].tensor): n for n, i in enumerate(mine_idx)}
        request_items = [position[id(r.tensor)] for r in plan.requests]
        nbytes = sum(aligned(items[i].tensor.numel() * items[i].tensor.element_size()) for i in mine_idx)
        return cls(key, items, plan, mine_idx, request_items, nbytes)

    @property
    def mine(self) -> list[TensorItem]:
        return [self.items[i] for i in self.mine_idx]

    def host_views(self, slab: Any) -> tuple[list[torch.Tensor], list[Any]]:
        """This plan's tensors carved out of ``slab``, and the write requests reading them
        (computed once per slab, then reused)."""
        memo = self._memo.get(id(slab))
        if memo is None or memo[0] is not slab:
            slab.reset()
            views = [slab.carve(self.items[i].tensor.shape, self.items[i].tensor.dtype) for i in self.mine_idx]
            requests = [WriteRequest(r.path, r.index, views[n], r.slices, r.chunk_shape, r.separator)
                        for r, n in zip(self.plan.requests, self.request_items)]
            memo = self._memo[id(slab)] = (slab, views, requests)
        return memo[1], memo[2]


def prefault(pool: Any, plan: CapturePlan, *, slabs: int = 2, stop: Callable[[], bool] = lambda: False) -> None:
    """Take up to ``slabs`` slabs of ``plan``'s size from ``pool`` (allocating them), fault every
    page in, carve the plan's views, and give them back: the first checkpoints then copy into
    memory that is ready (a first touch costs a page fault per 4 KiB, in the middle of a step).
    ``stop`` is asked before each slab (a closing Checkpointer needs none)."""
    taken = []
    try:
        for _ in range(slabs):
            if stop():
                break
            slab = pool.acquire(plan.nbytes, block=False)
            if slab is None:
                break
            taken.append(slab)
            if not pool.pin_memory:  # pinned memory is faulted in by the pinning itself
                slab.buffer.fill_(0)
            plan.host_views(slab)
    finally:
        for slab in taken:
            pool.release(slab)


def lazy_owners(optimizers: list[torch.optim.Optimizer]) -> dict[int, int]:
    """Storage of every tensor only an attached optimizer changes -> that optimizer's index."""
    owners: dict[int, int] = {}
    for index, opt in enumerate(optimizers):
        for group in opt.param_groups:
            for p in group["params"]:
                owners.setdefault(storage_ptr(p), index)
                for v in opt.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor):
                        owners.setdefault(storage_ptr(v), index)
    owners.pop(0, None)
    return owners
