"""Mapping a shared-memory segment as a tensor: the one thing both sides do with a segment.

The daemon maps the segments it makes (:mod:`agent.daemon.segments`); a trainer maps those it
leases to stage into, and those the agent holds to restore from (:mod:`agent.trainer`).
"""

from __future__ import annotations

import mmap
import os
import warnings

import torch


def map_file(path: str, nbytes: int, *, writable: bool) -> tuple[mmap.mmap, torch.Tensor]:
    """Map ``path`` and view it as a uint8 tensor (read-only mappings: do not write to it).

    The mapping lives as long as the returned ``mmap`` object or any tensor made from it (views
    included): drop the references, never ``close()`` it. ``torch.frombuffer`` lets go of its
    buffer export at once and keeps only a reference to the mapping, so ``close()`` succeeds
    under live tensors and leaves them pointing at unmapped memory (a crash at their next touch);
    dropped instead, the mapping is unmapped by the last of them."""
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise ValueError(f"segment {path} has {size} bytes, expected {nbytes}")
        mm = mmap.mmap(fd, nbytes, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we never write through it
        tensor = torch.frombuffer(mm, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
    return mm, tensor
