"""Host memory for snapshots: slabs allocated once under a hard budget and reused.

A snapshot takes one slab big enough for every tensor this process writes, carved into
views: a tensor of a page or more starts on a page, a smaller one on a cache line. Slabs return to the pool when the snapshot is persisted, and the next
snapshot of the same size reuses one, so after warm-up no checkpoint allocates. On CUDA the
slabs are pinned, so device-to-host copies run at full bandwidth and asynchronously.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .errors import CkptError

log = logging.getLogger(__name__)

ALIGN = 4096  # a tensor of a page or more starts on a page: its chunk bodies can be written with O_DIRECT
DENSE = 64  # a smaller one starts on a cache line (every element size divides it)


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def slot(used: int, n: int) -> int:
    """Where a tensor of ``n`` bytes starts in a slab whose first ``used`` bytes are taken. Small
    tensors lie side by side: a model's thousands of norms and biases then take a few pages, not
    a page each (a page fault each to stage, and again to read back)."""
    return -(-used // ALIGN) * ALIGN if n >= ALIGN else -(-used // DENSE) * DENSE


def carved_bytes(sizes: Iterable[int]) -> int:
    """The bytes of a slab that tensors of ``sizes`` bytes, carved in that order, take (whole
    pages: a slab is)."""
    used = 0
    for n in sizes:
        used = slot(used, n) + n
    return aligned(used)


class HostBudgetError(ValueError):
    """A snapshot needs more host memory than the whole budget."""


@dataclass(eq=False)
class Slab:
    """One host buffer; ``carve`` hands out views of it in order.

    ``handle`` is whatever the allocator that made the buffer needs to name it to someone
    else (a shared-memory segment's name, for a node agent); ``None`` for private memory.
    """

    buffer: torch.Tensor
    used: int = 0
    _pool: HostBufferPool | None = field(default=None, repr=False)
    handle: Any = None
    _typed: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)  # the slab seen as each dtype

    def offset_of(self, view: torch.Tensor) -> int:
        """Byte offset of a carved view in this slab."""
        return view.data_ptr() - self.buffer.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def carve(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of ``shape`` and ``dtype`` at the slab's next :func:`slot` (one
        strided view of the slab seen as ``dtype``: thousands are carved per plan)."""
        itemsize = dtype.itemsize
        stride = []
        step = numel = 1
        for size in reversed(shape):  # torch's contiguous strides (a dimension of 0 counts as 1)
            stride.append(step)
            step *= max(size, 1)
            numel *= size
        n = numel * itemsize
        start = slot(self.used, n)
        if start + n > self.nbytes:
            raise HostBudgetError(f"slab of {self.nbytes} bytes cannot hold {start + n}")
        self.used = start + n
        typed = self._typed.get(dtype)
        if typed is None:
            typed = self._typed[dtype] = self.buffer[: self.nbytes - self.nbytes % itemsize].view(dtype)
        return typed.as_strided(tuple(shape), tuple(reversed(stride)), typed.storage_offset() + start // itemsize)

    def reset(self) -> None:
        self.used = 0


class Allocator(Protocol):
    """Makes and frees slab memory: private memory by default, shared memory for an agent."""

    def allocate(self, nbytes: int, *, pin_memory: bool) -> tuple[torch.Tensor, Any]:
        """A uint8 tensor of ``nbytes`` and the handle that names it (or ``None``)."""

    def free(self, buffer: torch.Tensor, handle: Any) -> None:
        """Give the memory back (the pool drops its last reference right after)."""


class PrivateAllocator:
    """Plain (optionally pinned) memory of this process."""

    def allocate(self, nbytes: int, *, pin_memory: bool) -> tuple[torch.Tensor, Any]:
        raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin_memory)
        start = -raw.data_ptr() % ALIGN
        return raw[start : start + nbytes], None

    def free(self, buffer: torch.Tensor, handle: Any) -> None:
        pass


class HostBufferPool:
    """Slabs under a hard byte budget; ``acquire`` blocks (or gives up) when the budget is used."""

    def __init__(self, budget_bytes: int, *, pin_memory: bool = False, allocator: Allocator | None = None) -> None:
        if budget_bytes < 1:
            raise ValueError("host budget must be >= 1 byte")
        self.budget = budget_bytes
        self.pin_memory = pin_memory
        self.allocator: Allocator = allocator or PrivateAllocator()
        self._free: list[Slab] = []
        self._allocated = 0
        self._cond = threading.Condition()
        self.peak_bytes = 0
        self.allocations = 0
        self._largest = 0  # twice the largest snapshot asked for (follow)

    def follow(self, nbytes: int) -> None:
        """An automatic budget: at least twice the largest snapshot asked for so far (an
        optimizer's state that appears after the first save, a rank with nothing to write at first)."""
        want = 2 * aligned(max(nbytes, 1))
        if want > self._largest:
            self._largest = want
            self.budget = max(self.budget, want)

    @property
    def allocated_bytes(self) -> int:
        with self._cond:
            return self._allocated

    def acquire(self, nbytes: int, *, block: bool = True, timeout: float | None = None,
                cancel: threading.Event | None = None) -> Slab | None:
        """A slab of at least ``nbytes``; ``None`` if not ``block`` (or timed out, or ``cancel``
        was set: :meth:`wake` ends a wait at once) and none is free."""
        need = aligned(max(nbytes, 1))  # whole pages: what is left of a page is no slab
        if need > self.budget:
            raise HostBudgetError(
                f"a snapshot needs {need / 2**20:.1f} MiB of host memory, more than the whole budget of "
                f"{self.budget / 2**20:.1f} MiB; raise host_budget_bytes"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                slab = self._take(need)
                if slab is not None:
                    slab.reset()
                    return slab
                if not block or (cancel is not None and cancel.is_set()):
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def _take(self, need: int) -> Slab | None:
        fits = [s for s in self._free if s.nbytes >= need]
        if fits:
            best = min(fits, key=lambda s: s.nbytes)
            self._free.remove(best)
            return best
        # Drop idle slabs that are too small (the state grew) until the new one fits.
        while self._allocated + need > self.budget and self._free:
            dropped = self._free.pop(0)
            self._allocated -= dropped.nbytes
            self.allocator.free(dropped.buffer, dropped.handle)
        if self._allocated + need > self.budget:
            return None
        buffer, handle = self.allocator.allocate(need, pin_memory=self.pin_memory)
        self._allocated += need
        self.allocations += 1
        self.peak_bytes = max(self.peak_bytes, self._allocated)
        return Slab(buffer, 0, self, handle)

    def wake(self) -> None:
        """Wake every ``acquire`` waiting, so that one whose ``cancel`` is set returns."""
        with self._cond:
            self._cond.notify_all()

    def release(self, slab: Slab) -> None:
        with self._cond:
            self._free.append(slab)
            self._cond.notify_all()

    def clear(self) -> None:
        """Free idle slabs (at close)."""
        with self._cond:
            for s in self._free:
                self._allocated -= s.nbytes
                self.allocator.free(s.buffer, s.handle)
            self._free.clear()


def take_slab(pool: HostBufferPool, nbytes: int, *, step: int, when_busy: str, timeout: float | None,
              cancel: threading.Event) -> Slab | None:
    """The slab for the snapshot of ``step``, waiting for one to come free if ``when_busy`` is
    ``"block"`` (up to ``timeout``, or until ``cancel`` is set); ``None``: the snapshot is
    skipped (a warning says why). A wait that times out raises :class:`CkptError`."""
    block = when_busy == "block"
    slab = pool.acquire(nbytes, block=block, timeout=timeout if block else None, cancel=cancel)
    if slab is not None:
        return slab
    if block and not cancel.is_set():
        raise CkptError(f"checkpoint of step {step}: no host buffer came free within {timeout:g} s "
                        "(buffer_wait_timeout_s); the earlier checkpoints still hold the whole host budget: "
                        "is the storage or the node agent stuck?")
    why = ("interrupted while it waited for host memory" if cancel.is_set() else "the previous one is still being "
           "written (when_busy='skip'; raise host_budget_bytes or checkpoint less often)")
    cancel.clear()
    log.warning("checkpoint of step %d skipped: %s", step, why)
    return None
