"""Chunks read out of a shared-memory segment by offset, with ``pread`` (the kernel copies: a
fresh mapping of the segment would take a page fault per few pages first), each checked with
crc32c as it lands.

:func:`pread_crc` reads one chunk (in blocks, the crc reading each block while it is in cache);
:func:`pread_many` reads a batch: chunks that lie side by side in the segment (a model's small
tensors, one after another) are read with one ``preadv`` of up to ``IOV_MAX`` buffers, small gaps
between them read into scratch. 2,000 chunks of a few hundred bytes are then a few system calls,
not 2,000. :func:`read_whole` fills whole tensors: small chunks copied out of the segment's
mapping, one ``memmove`` each (below :data:`SMALL` bytes a mapped page costs less than making a
buffer of the destination for ``preadv``), the others with :func:`pread_many`.
"""

from __future__ import annotations

import ctypes
import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from operator import add, attrgetter, getitem
from typing import Any

import crc32c
import torch

from ckpt.chunks import as_bytes

from ..shm import map_file

BLOCK = 1 << 20  # one pread + crc32c per block of a large chunk
GAP = 64 << 10  # chunks at most this far apart are read together (the gap into scratch)
# A chunk stored whole in a segment: (the segment's fd, offset, the segment's mapping, the
# mapping's address, bytes, crc32c, the tier that serves it)
Span = tuple[int, int, memoryview, int, int, int, Any]
SMALL = 64 << 10  # chunks below this are copied out of the mapping (copy_small)
_nbytes = attrgetter("nbytes")
# memmove holding the GIL: ctypes.memmove lets it go and takes it back around every call, which
# costs more than copying a small chunk (thousands per restore: 0.44 instead of 0.58 ms for 2,160).
_memmove = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(
    ctypes.cast(ctypes.memmove, ctypes.c_void_p).value)
IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)


def pread_crc(fd: int, offset: int, dest: memoryview) -> int | None:
    """Fill ``dest`` from ``fd`` at ``offset``; the crc32c of what was read, or None if the
    segment is shorter than expected."""
    crc = 0
    pos = 0
    n = dest.nbytes
    while pos < n:
        block = dest[pos: min(n, pos + BLOCK)]
        got = os.preadv(fd, [block], offset + pos)
        if got <= 0:
            return None
        crc = crc32c.crc32c(block[:got], crc)
        pos += got
    return crc


def pread_many(fd: int, spans: list[tuple[int, memoryview]]) -> list[int | None]:
    """Fill each ``(offset, dest)`` of ``spans`` from ``fd``; per span, the crc32c of what was
    read, or None if the segment is shorter than expected."""
    out: list[int | None] = [None] * len(spans)
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    scratch = memoryview(bytearray(GAP))
    group: list[int] = []
    iov: list[memoryview] = []
    start = end = 0

    def flush() -> None:
        if not group:
            return
        got = os.preadv(fd, iov, start) if len(group) > 1 else -1
        for i in group:
            if got == end - start:
                out[i] = crc32c.crc32c(spans[i][1])
            else:  # one chunk, or the segment ended early: each on its own (a short one is None)
                out[i] = pread_crc(fd, spans[i][0], spans[i][1])
        group.clear()
        iov.clear()

    for i in order:
        offset, dest = spans[i]
        n = dest.nbytes
        if n >= BLOCK:  # a large chunk: in blocks, as it lands
            out[i] = pread_crc(fd, offset, dest)
            continue
        gap = offset - end
        if group and (gap < 0 or gap > GAP or len(iov) + 2 > IOV_MAX):
            flush()
        if not group:
            start = end = offset
        elif gap:
            iov.append(scratch[:gap])
        group.append(i)
        iov.append(dest)
        end = offset + n
    flush()
    return out


def read_whole(spans: dict[str, Span], items: Sequence[tuple[str, torch.Tensor]],
               bring: Callable[[str], None]) -> dict[Any, list[int]] | None:
    """Fill each ``(key, tensor)`` (a contiguous CPU tensor) with the chunk ``spans`` holds at
    ``key`` (``bring(key)`` first makes a peer's chunk local, if it can), each checked against its
    crc32c; per tier, the bytes and chunks served. None if a chunk is not held whole or does not
    match (some tensors may have been filled). A chunk under :data:`SMALL` bytes is checked in
    the segment's mapping and copied with one ``memmove`` (all of them in C loops when every chunk
    is small: thousands of arrays); the others are read with ``preadv`` (:func:`pread_many`), a
    few calls per segment, and checked as they land."""
    if not items:
        return {}
    keys, tensors = zip(*items)
    found = list(map(spans.get, keys))  # thousands of lookups in one C loop
    if None in found:
        for i, key in enumerate(keys):
            if found[i] is None:
                bring(key)
                found[i] = spans.get(key)
                if found[i] is None:
                    return None
    columns = tuple(zip(*found))  # (fds, offsets, views, bases, sizes, crcs, tiers): checks and copies in C loops
    if not fill(tensors, *columns[:6]):
        return None
    sizes, tiers = columns[4], columns[6]
    if len(set(tiers)) == 1:  # (one tier served all)
        return {tiers[0]: [sum(sizes), len(sizes)]}
    served: dict[Any, list[int]] = {}
    for tier, n in zip(tiers, sizes):
        total = served.get(tier) or served.setdefault(tier, [0, 0])
        total[0] += n
        total[1] += 1
    return served


def memory_threads(default: int) -> int:
    """Threads for copies out of memory: one per core (2x faster than 8 threads on 2 cores)."""
    return max(1, min(default, max(2, os.cpu_count() or 1)))


def open_segment(path: str, nbytes: int, maps: list[Any], fds: list[int]) -> tuple[int, memoryview, torch.Tensor]:
    """A segment mapped read-only (kept in ``maps``) and opened for pread (kept in ``fds``): its
    fd, its mapping and the mapping as a uint8 tensor."""
    mm, tensor = map_file(path, nbytes, writable=False)
    maps.append(mm)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    fds.append(fd)
    return fd, memoryview(mm), tensor


def _crcs(views: Sequence[memoryview], starts: Sequence[int], ends: Iterable[int]) -> tuple[int, ...]:
    return tuple(map(crc32c.crc32c, map(getitem, views, map(slice, starts, ends))))


def _copy_out(tensors: Sequence[torch.Tensor], bases: Sequence[int], offsets: Sequence[int],
              sizes: Sequence[int]) -> None:
    deque(map(_memmove, map(torch.Tensor.data_ptr, tensors), map(add, bases, offsets), sizes), maxlen=0)


def fill(tensors: Sequence[torch.Tensor], fds: Sequence[int], offsets: Sequence[int], views: Sequence[memoryview],
         bases: Sequence[int], sizes: Sequence[int], expected: Sequence[int]) -> bool:
    """Fill each tensor (contiguous, on the CPU) from the chunk at the same place of the columns
    (its segment's fd, mapping and mapping's address; its offset, bytes and crc32c), each checked
    against its crc32c: whether all were (if not, some tensors may have been written)."""
    if tuple(map(_nbytes, tensors)) != tuple(sizes):
        return False
    if max(sizes, default=0) < SMALL:  # (the usual case at thousands of arrays) every chunk copied out of its mapping
        if _crcs(views, offsets, map(add, offsets, sizes)) != tuple(expected):
            return False
        _copy_out(tensors, bases, offsets, sizes)
        return True
    memmove, crc = _memmove, crc32c.crc32c
    groups: dict[int, tuple[list[tuple[int, memoryview]], list[int]]] = {}
    for fd, offset, view, base, n, crc_, tensor in zip(fds, offsets, views, bases, sizes, expected, tensors):
        if n < SMALL:
            if crc(view[offset:offset + n]) != crc_:
                return False
            memmove(tensor.data_ptr(), base + offset, n)
        else:
            group = groups.get(fd) or groups.setdefault(fd, ([], []))
            group[0].append((offset, as_bytes(tensor)))
            group[1].append(crc_)
    return all(pread_many(fd, got) == crcs for fd, (got, crcs) in groups.items())


def fill_runs(tensors: Sequence[torch.Tensor], bases: Sequence[int], offsets: Sequence[int], sizes: Sequence[int],
              run_views: Sequence[memoryview], run_starts: Sequence[int], run_ends: Sequence[int],
              run_crcs: Sequence[int]) -> bool:
    """Fill each tensor from its chunk (its mapping's address, offset and bytes) after checking
    the runs of chunks that hold them (each run's mapping, start, end and crc32c: checked chunk by
    chunk by whoever recorded it): a few crc32c calls instead of one per chunk. Whether all were
    (False: nothing was written)."""
    if tuple(map(_nbytes, tensors)) != tuple(sizes):
        return False
    if _crcs(run_views, run_starts, run_ends) != tuple(run_crcs):
        return False
    _copy_out(tensors, bases, offsets, sizes)
    return True


def close_fds(fds: list[int]) -> None:
    """Close the segments' descriptors (a restore source's, when it is collected)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
