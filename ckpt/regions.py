"""Reading a region of a stored array, and streaming a whole tensor's bytes in row-major order.

The readers above the executor that need a box of one array, not a load into a state dict,
come here: ``ckpt export`` streams each tensor block by block into one file, ``ckpt reshard``
reads each target block from the source chunks that overlap it. A region read plans the chunk
reads that overlap the box (:func:`ckpt.planning.plan_array_reads`) and hands them to the one
executor (:func:`ckpt.io.read_chunks`), which checks every chunk's presence, size and checksum
(and, when given, the crc its writer recorded).

:func:`row_major_blocks` tiles an array into boxes that are each contiguous in row-major order
and fit a byte budget, preferably whole chunk rows, so that :func:`iter_tensor_bytes` yields
the tensor's bytes in order while holding one block at a time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .dtypes import info_by_name
from .io import ChunkExpectation, read_chunks
from .layout import Box, Piece
from .layouts import Locator
from .manifest import ArraySpec
from .planning import plan_array_reads
from .storage import Storage


def read_region(
    storage: Storage, locator: Locator, spec: ArraySpec, box: Box, out: torch.Tensor, *, threads: int,
    expected_crc: Callable[[str, tuple[int, ...]], int | None] | None = None,
) -> None:
    """Fill ``out`` (shaped like ``box``) with ``box`` of the stored array; every chunk checked."""
    dtype = info_by_name(spec.dtype).torch_dtype
    requests = plan_array_reads(spec.path, spec, out, [Piece(box, tuple(0 for _ in box.offsets))])
    if expected_crc is None:
        def expectation(_r: Any) -> ChunkExpectation:
            return ChunkExpectation(dtype)
    else:
        def expectation(r: Any) -> ChunkExpectation:
            return ChunkExpectation(dtype, expected_crc(r.path, r.index))
    read_chunks(storage, locator, requests, expectation, threads=threads)


def row_major_blocks(spec: ArraySpec, itemsize: int, budget: int) -> Iterator[Box]:
    """Boxes that tile the array in row-major order, each contiguous in row-major layout.

    A block spans whole trailing dimensions and a run along one dimension, preferably whole
    chunk rows; its size is at most ``budget`` bytes (or one row of the last dimension's
    element, when even that is larger).
    """
    shape = spec.shape
    if not shape:
        yield Box((), ())
        return
    if any(s == 0 for s in shape):
        return
    d = next((i for i in range(len(shape)) if math.prod(shape[i + 1 :]) * itemsize <= budget), len(shape) - 1)
    inner = math.prod(shape[d + 1 :]) * itemsize
    height = max(1, budget // inner)
    if height >= spec.chunk_shape[d]:
        height -= height % spec.chunk_shape[d]
    height = min(height, shape[d])
    for prefix in itertools.product(*(range(s) for s in shape[:d])):
        for start in range(0, shape[d], height):
            n = min(height, shape[d] - start)
            yield Box(
                tuple(prefix) + (start,) + tuple(0 for _ in shape[d + 1 :]),
                tuple(1 for _ in prefix) + (n,) + tuple(shape[d + 1 :]),
            )


def iter_tensor_bytes(
    storage: Storage, locator: Locator, spec: ArraySpec, *, threads: int, buffer_bytes: int,
    cast: torch.dtype | None = None,
) -> Iterator[memoryview]:
    """The tensor's bytes in row-major order (cast to ``cast`` if given), one block at a time."""
    dtype = info_by_name(spec.dtype).torch_dtype
    for box in row_major_blocks(spec, dtype.itemsize, buffer_bytes):
        buf = torch.empty(box.sizes, dtype=dtype)
        read_region(storage, locator, spec, box, buf, threads=threads)
        if cast is not None and cast != dtype:
            buf = buf.to(cast)
        yield memoryview(buf.reshape(-1).view(torch.uint8).numpy())
