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
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

import crc32c
import torch

from ckpt.chunks import as_bytes

BLOCK = 1 << 20  # one pread + crc32c per block of a large chunk
GAP = 64 << 10  # chunks at most this far apart are read together (the gap into scratch)
# A chunk stored whole in a segment: (the segment's fd, offset, the segment's mapping, the
# mapping's address, bytes, crc32c, the tier that serves it)
Span = tuple[int, int, memoryview, int, int, int, Any]
SMALL = 64 << 10  # chunks below this are copied out of the mapping (copy_small)
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
    crc32c; per tier, the bytes and chunks served. None at the first chunk not held whole or not
    matching (tensors before it may have been filled). A chunk under :data:`SMALL` bytes is
    checked in the segment's mapping and copied with one ``memmove``; the others are read with
    ``preadv`` (:func:`pread_many`), a few calls per segment, and checked as they land."""
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
    memmove, crc = ctypes.memmove, crc32c.crc32c
    groups: dict[int, tuple[list[tuple[int, memoryview]], list[int]]] = {}
    for (fd, offset, view, base, n, expected, _tier), tensor in zip(found, tensors):
        if tensor.nbytes != n:
            return None
        if n < SMALL:
            if crc(view[offset:offset + n]) != expected:
                return None
            memmove(tensor.data_ptr(), base + offset, n)
        else:
            group = groups.get(fd) or groups.setdefault(fd, ([], []))
            group[0].append((offset, as_bytes(tensor)))
            group[1].append(expected)
    if not all(pread_many(fd, got) == crcs for fd, (got, crcs) in groups.items()):
        return None
    tiers = set(map(itemgetter(6), found))
    if len(tiers) == 1:  # (one tier served all: counted in C loops)
        return {tiers.pop(): [sum(map(itemgetter(4), found)), len(found)]}
    served: dict[Any, list[int]] = {}
    for span in found:
        total = served.get(span[6]) or served.setdefault(span[6], [0, 0])
        total[0] += span[4]
        total[1] += 1
    return served


def close_fds(fds: list[int]) -> None:
    """Close the segments' descriptors (a restore source's, when it is collected)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
