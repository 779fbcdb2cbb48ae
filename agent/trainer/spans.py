"""Chunks read out of a shared-memory segment by offset, with ``pread`` (the kernel copies: a
fresh mapping of the segment would take a page fault per few pages first), each checked with
crc32c as it lands.

:func:`pread_crc` reads one chunk (in blocks, the crc reading each block while it is in cache);
:func:`pread_many` reads a batch: chunks that lie side by side in the segment (a model's small
tensors, one after another) are read with one ``preadv`` of up to ``IOV_MAX`` buffers, small gaps
between them read into scratch. 2,000 chunks of a few hundred bytes are then a few system calls,
not 2,000. :func:`copy_small` copies small chunks out of the segment's mapping instead, one
``memmove`` each: below :data:`SMALL` bytes a mapped page costs less than making a buffer of the
destination for ``preadv``.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import Any

import crc32c

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


def copy_small(items: Sequence[tuple[int, Span]]) -> bool:
    """Per ``(destination address, span)``: the chunk's bytes checked against its crc32c in the
    segment's mapping, then copied to the destination. False at the first that does not match
    (the ones before it were copied)."""
    memmove, crc = ctypes.memmove, crc32c.crc32c
    for dest, (_fd, offset, view, base, n, expected, _tier) in items:
        if crc(view[offset:offset + n]) != expected:
            return False
        memmove(dest, base + offset, n)
    return True


def close_fds(fds: list[int]) -> None:
    """Close the segments' descriptors (a restore source's, when it is collected)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()
