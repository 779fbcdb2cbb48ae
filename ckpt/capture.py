"""Capture: what ``Checkpointer.save`` knows of a state before it copies anything. A plan of the
save built once and reused while the tensors stay the same (same memory, shape, layout), with
the host views of each slab and the write requests that read them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import chunks
from .hostpool import carved_bytes
from .layout import Sharded, is_dtensor, layout_of
from .plan import SavePlan, TensorItem, plan_items
from .planning import WriteRequest

log = logging.getLogger(__name__)


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
        nbytes = carved_bytes(items[i].tensor.numel() * items[i].tensor.element_size() for i in mine_idx)
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
            requests = [WriteRequest(r.path, r.index, views[n], r.slices, r.chunk_shape, r.separator,
                                     chunks.stored_view(views[n], r.slices, ragged=r.ragged))
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


class Preparation:
    """A first checkpoint's plan and host memory made ready on a thread of its own
    (:meth:`ckpt.Checkpointer.prepare`): ``work(stop, planned)`` builds them, calls ``planned()``
    once the plan is built and asks ``stop()`` between slabs.

    ``deferred``: the work waits for the training loop's next call (:meth:`called`: a ``save``,
    an attached optimizer's step), after a restore whose next step takes no checkpoint: the
    node's other ranks, still restoring, then have its cores to themselves, and a restore that
    is not followed by training (an evaluation) builds nothing. If that call is the save of a
    checkpoint (a loop that calls ``save`` only then, as the framework integrations do), the work
    never begins: that save plans and allocates what it needs itself rather than wait for two
    slabs. The thread is started at once either way (a thread that starts and runs Python holds
    its starter for a GIL switch interval, 5 ms; one that starts and waits does not).

    :meth:`stop` waits for the plan (CPU work, with the cycle collector paused), not for the
    slabs. A slab being made (pinned, or leased from a node agent, mapped and registered: seconds
    for a few GB) cannot be cut short, and a Checkpointer closed right after its restore would
    wait for memory nobody will use. The ``cleanup`` that frees the host memory runs at once if
    the work is over, else on this thread as the work ends."""

    def __init__(self, work: Callable[[Callable[[], bool], Callable[[], None]], None], *, deferred: bool = False) -> None:
        self.future: Future = Future()
        self._lock = threading.Lock()
        self._stopped = False
        self._done = False
        self._cleanup: Callable[[], None] | None = None
        self._planned = threading.Event()
        self._go = threading.Event()
        if not deferred:
            self._go.set()
        self._thread = threading.Thread(target=self._run, args=(work,), name="ckpt-prepare", daemon=True)
        self._thread.start()

    def go(self) -> None:
        """Start the deferred work (at once if it was not deferred; then nothing to do)."""
        self._go.set()

    def called(self, checkpoint: bool) -> None:
        """The training loop's call (``checkpoint``: a save that takes one): see the class."""
        if checkpoint and not self._go.is_set():
            self.halt()
        else:
            self._go.set()

    def _run(self, work: Callable[[Callable[[], bool], Callable[[], None]], None]) -> None:
        try:
            self._go.wait()
            if self._stopped:  # stopped before it began: nothing made, nothing to free
                self.future.set_result(None)
                return
            work(lambda: self._stopped, self._planned.set)
            self.future.set_result(None)
        except BaseException as e:  # noqa: BLE001 - the first save then does it, and says why
            log.debug("preparing the first checkpoint failed: %s", e)
            self.future.set_exception(e)
        finally:
            self._planned.set()  # (a work that failed before its plan)
            with self._lock:
                self._done = True
                cleanup = self._cleanup
            if cleanup is not None:
                cleanup()

    def stop(self, cleanup: Callable[[], None]) -> None:
        """No more slabs; ``cleanup`` now if the work is over, else when it ends. Returns once the
        plan is built (at once if the work had not begun: then it never does)."""
        self._stopped = True
        self._go.set()
        self._planned.wait()
        with self._lock:
            if not self._done:
                self._cleanup = cleanup
                return
        cleanup()

    def halt(self) -> None:
        """No more slabs, nothing freed and nothing waited for: a newer preparation of the same
        Checkpointer (a second restore) takes over its pool."""
        self._stopped = True
        self._go.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


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
