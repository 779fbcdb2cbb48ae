"""``ckpt.dcp.HostStager``: a stager for ``dcp.async_save`` on ckpt's budgeted host pool.

``dcp.async_save(state, storage_writer=ckpt.dcp.Writer(url, step=n), async_stager=stager)``
asks the stager for a copy of the state that training may not change while it is written.
``HostStager`` copies every tensor (a DTensor's local shard, rewrapped with its mesh and
placements) into one slab of a :class:`~ckpt.hostpool.HostBufferPool`: memory under a hard
budget, allocated once and reused from one checkpoint to the next (pinned where CUDA is, in
shared memory for the process mode, so the copy reaches DCP's checkpoint process without
another). When the budget is in use (a save still running), ``stage`` waits for a slab, at most
``wait_timeout_s``. A slab returns to the pool when DCP drops the staged copy, i.e. when its
save is done; ``close`` frees the idle ones. Non-tensor values are deep-copied.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.staging import AsyncStager

from ..errors import CkptError
from ..hostpool import ALIGN, HostBufferPool, Slab, carved_bytes
from ..layout import is_dtensor


class _SharedAllocator:
    """Slabs in shared memory (DCP's process mode hands the staged copy to another process)."""

    def allocate(self, nbytes: int, *, pin_memory: bool) -> tuple[torch.Tensor, Any]:
        raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8).share_memory_()
        start = -raw.data_ptr() % ALIGN
        return raw[start:start + nbytes], None

    def free(self, buffer: torch.Tensor, handle: Any) -> None:
        pass


class _Staged(dict):
    """The staged state (a dict that can carry a finalizer)."""


class HostStager(AsyncStager):
    """Stages ``dcp.async_save``'s state into ckpt's host buffer pool.

    ``budget_bytes``: host memory for staged copies (twice one state lets a save run while the
    next is staged); ``pin_memory``: default, when CUDA is available; ``shared_memory``: for
    ``AsyncCheckpointerType.PROCESS``; ``background``: copy on a thread (``stage`` returns a
    future and ``async_save`` an ``AsyncSaveResponse`` whose ``staging_completion`` says when
    training may change the state again).
    """

    def __init__(self, budget_bytes: int, *, pin_memory: bool | None = None, shared_memory: bool = False,
                 wait_timeout_s: float = 600.0, background: bool = False) -> None:
        if wait_timeout_s <= 0:
            raise ValueError(f"wait_timeout_s must be > 0, got {wait_timeout_s}")
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.pool = HostBufferPool(budget_bytes, pin_memory=pin and not shared_memory,
                                   allocator=_SharedAllocator() if shared_memory else None)
        self.wait_timeout_s = wait_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-dcp-stage") if background else None
        self._synchronize_after_execute = False

    def stage(self, state_dict: dict[str, Any], **kwargs: Any) -> dict[str, Any] | Future[dict[str, Any]]:
        if self._executor is not None:
            return self._executor.submit(self._stage, state_dict)
        return self._stage(state_dict)

    def synchronize_staging(self) -> None:
        """Staging is complete when ``stage`` (or its future) returns: nothing to wait for."""

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self.pool.clear()

    def _stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        sources: list[torch.Tensor] = []
        _walk(state_dict, lambda t: sources.append(_local(t)) or t)
        need = carved_bytes(t.numel() * t.element_size() for t in sources)
        slab = self.pool.acquire(need, timeout=self.wait_timeout_s)
        if slab is None:
            raise CkptError(f"no host memory to stage {need / 2**20:.1f} MiB within {self.wait_timeout_s:.0f} s: "
                            f"the budget ({self.pool.budget / 2**20:.1f} MiB) is held by saves still running")
        try:
            staged = _Staged(_walk(state_dict, lambda t: _copy_into(slab, t)))
        except BaseException:
            self.pool.release(slab)
            raise
        weakref.finalize(staged, self.pool.release, slab)
        return staged


def _local(t: Any) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def _copy_into(slab: Slab, t: Any) -> Any:
    src = _local(t).detach()
    dst = slab.carve(src.shape, src.dtype)
    dst.copy_(src)
    if not is_dtensor(t):
        return dst
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(dst, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())


def _walk(x: Any, fn: Callable[[Any], Any]) -> Any:
    """``x`` with every tensor replaced by ``fn`` of it, everything else copied."""
    if isinstance(x, torch.Tensor) or is_dtensor(x):
        return fn(x)
    if isinstance(x, dict):
        return {k: _walk(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and type(x) in (list, tuple):
        return type(x)(_walk(v, fn) for v in x)
    return copy.deepcopy(x)
