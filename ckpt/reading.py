"""Chunks read into their destinations, in batches, on a few threads.

Every chunk's presence, size and checksum is checked; a chunk that maps onto a contiguous region
of a CPU destination is read straight into it (no copy), any other through a buffer (pinned when
it goes to a GPU, the copies queued). Small chunks travel in batches: thousands of arrays of a
few hundred bytes each would otherwise cost a future, a lock, a GIL hand-over and a storage call
apiece. A restore source (``ckpt.restore``) gets each batch whole (``read_chunk_batch``), so a
tier that holds chunks side by side (the node agent's memory) serves a batch with a few large
reads. ``ckpt.io`` re-exports what its callers use.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from . import chunks, layouts
from .chunks import CRC_BYTES, as_bytes
from .errors import CorruptCheckpointError, FormatError
from .layouts import Location, Locator
from .planning import ReadRequest
from .readahead import ReadAhead
from .restore import RestoreSource
from .restore import read_chunk as read_stored_chunk
from .storage import Storage

Progress = Callable[[int], None]

# Small items are handed to the threads in batches of about this many bytes (and at most
# BATCH_ITEMS once a batch holds MIN_BATCH_BYTES): thousands of tiny chunks cost a future, a lock
# and a GIL hand-over each otherwise.
BATCH_BYTES = 4 << 20
BATCH_ITEMS = 256
# ... and no batch smaller than this: below it a second thread costs more (GIL hand-overs) than
# the I/O it overlaps (a 0.5 MB state of 2,900 tensors loads 1.5x faster on one thread than on 8).
MIN_BATCH_BYTES = 1 << 20


def _batches(items: Sequence, weights: Sequence[int], threads: int) -> list[tuple[list, int]]:
    """``items`` in order, cut into batches (each with its weight)."""
    total = sum(weights)
    # Enough batches to keep every thread busy, none much larger than BATCH_BYTES.
    target = max(MIN_BATCH_BYTES, min(BATCH_BYTES, total // max(1, 4 * threads)))
    out: list[tuple[list, int]] = []
    batch: list = []
    size = 0
    for it, w in zip(items, weights):
        if batch and (size >= target or (len(batch) >= BATCH_ITEMS and size >= MIN_BATCH_BYTES)):
            out.append((batch, size))
            batch, size = [], 0
        batch.append(it)
        size += w
    if batch:
        out.append((batch, size))
    return out


def _map_batches(fn: Callable[[list], list], items: Sequence, threads: int, progress: Progress | None,
                 weight: Callable) -> list:
    """``fn`` of every batch of ``items`` (a list of results per item), on ``threads`` threads;
    the results in the order of ``items``."""
    if not items:
        return []
    batches = _batches(items, [weight(it) for it in items], threads)
    if threads <= 1 or len(batches) == 1:
        out = []
        for batch, size in batches:
            out.extend(fn(batch))
            if progress:
                progress(size)
        return out
    with ThreadPoolExecutor(max_workers=min(threads, len(batches)), thread_name_prefix="ckpt-io") as pool:
        futures = [pool.submit(fn, batch) for batch, _ in batches]
        out = []
        try:
            for (_, size), f in zip(batches, futures):
                out.extend(f.result())
                if progress:
                    progress(size)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return out


def _map(fn: Callable, items: Sequence, threads: int, progress: Progress | None, weight: Callable) -> list:
    """``fn`` of every item, in order, on ``threads`` threads (small items in batches)."""
    return _map_batches(lambda batch: [fn(it) for it in batch], items, threads, progress, weight)


@dataclass(frozen=True, slots=True)
class ChunkExpectation:
    """What a reader knows of a chunk before reading it."""

    dtype: torch.dtype
    expected_crc: int | None = None  # from the writer's fragment, when the reader has it


def _bytes_of(region: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy (the caller keeps the
    tensor alive while they are used: its read request holds it)."""
    n = region.nbytes
    if n == 0:
        return as_bytes(region)
    return memoryview((ctypes.c_char * n).from_address(region.data_ptr())).cast("B")


def _fast_target(req: ReadRequest, dtype: torch.dtype) -> memoryview | None:
    """The destination's bytes when the whole chunk maps onto contiguous CPU memory of it."""
    if len(req.targets) != 1:
        return None
    t = req.targets[0]
    tensor = t.tensor
    if tensor.device.type != "cpu" or tensor.dtype != dtype:
        return None
    shape = req.chunk_shape
    for s, c in zip(t.src, shape):
        if s.start != 0 or s.stop != c:
            return None
    # The whole chunk into a tensor of the chunk's shape: the whole tensor (no view to make).
    region = tensor if tensor.shape == shape else tensor.detach()[t.dst]
    return _bytes_of(region) if region.is_contiguous() else None


def _where(req: ReadRequest, key: str) -> str:
    return f"tensor {req.path!r} chunk {'.'.join(map(str, req.index)) or '()'} ({key.split('/', 1)[-1]})"


@dataclass(slots=True)
class _Pending:
    """One chunk of a batch between its read and its check."""

    req: ReadRequest
    exp: ChunkExpectation
    nbytes: int
    key: str
    found: list[Location]
    chunk: torch.Tensor | None  # the buffer it is read into, when not straight into its destination


def _prepare(locator: Locator, req: ReadRequest, exp: ChunkExpectation) -> tuple[_Pending, tuple]:
    nbytes = math.prod(req.chunk_shape) * exp.dtype.itemsize
    key = locator.key(req.path, req.index)
    found: list[Location] = []

    def locate() -> Location:  # asked only by the tier that reads storage
        found.append(locator.locate(req.path, req.index))
        return found[-1]

    data = _fast_target(req, exp.dtype)
    chunk = None
    if data is None:
        # Into a GPU: through pinned memory (torch's caching host allocator keeps each block
        # until its copy is done), so the host-to-device copies run asynchronously on the copy engine.
        to_cuda = any(t.tensor.device.type == "cuda" for t in req.targets)
        chunk = torch.empty(nbytes, dtype=torch.uint8, pin_memory=to_cuda)
        data = memoryview(chunk.numpy())
    where = None if locator.layout.kind == layouts.CHUNKS else locate
    return _Pending(req, exp, nbytes, key, found, chunk), (key, data, where)


def _finish(p: _Pending, read: chunks.ChunkRead | BaseException) -> str | None:
    """Check what was read and copy it where it goes; a problem description instead of raising."""
    if isinstance(read, FileNotFoundError):
        return f"{_where(p.req, p.key)}: missing"
    if isinstance(read, EOFError):
        return f"{_where(p.req, p.key)}: truncated (shorter than {p.nbytes + CRC_BYTES} bytes)"
    if isinstance(read, BaseException):  # FormatError: the fragment that locates it is missing or damaged
        return f"{_where(p.req, p.key)}: {read}"
    recorded = p.exp.expected_crc if p.exp.expected_crc is not None else (
        p.found[-1].recorded_crc if p.found else None)
    problem = chunks.check(read, p.nbytes, recorded_crc=recorded)
    if problem is not None:
        return f"{_where(p.req, p.key)}: {problem}"
    if p.chunk is not None:
        values = p.chunk.view(p.exp.dtype).reshape(p.req.chunk_shape)
        for t in p.req.targets:
            t.tensor.detach()[t.dst].copy_(values[t.src], non_blocking=t.tensor.device.type == "cuda")
    return None


def _read_one(storage: Storage, key: str, data: memoryview, where: Any) -> chunks.ChunkRead | BaseException:
    try:
        return read_stored_chunk(storage, key, data, where)
    except (FileNotFoundError, EOFError, FormatError) as e:
        return e


def read_batch(storage: Storage, locator: Locator, requests: Sequence[ReadRequest],
               expectation: Callable[[ReadRequest], ChunkExpectation]) -> list[str | None]:
    """Read ``requests`` into their targets: per request, a problem description or None."""
    pending, items = [], []
    for req in requests:
        p, item = _prepare(locator, req, expectation(req))
        pending.append(p)
        items.append(item)
    if isinstance(storage, RestoreSource):
        reads = storage.read_chunk_batch(items)
    else:
        reads = [_read_one(storage, *item) for item in items]
    return [_finish(p, r) for p, r in zip(pending, reads)]


def read_chunks(
    storage: Storage,
    locator: Locator,
    requests: Sequence[ReadRequest],
    expectation: Callable[[ReadRequest], ChunkExpectation],
    *,
    threads: int,
    progress: Progress | None = None,
) -> None:
    """Read every chunk into its destinations; raises one error listing every bad chunk."""
    if not isinstance(storage, RestoreSource):  # (a restore source's bottom tier reads ahead itself)
        storage = ReadAhead(storage)
    itemsizes: dict[torch.dtype, int] = {}

    def weight(r: ReadRequest) -> int:
        dtype = expectation(r).dtype
        n = itemsizes.get(dtype) or itemsizes.setdefault(dtype, dtype.itemsize)
        for s in r.chunk_shape:
            n *= s
        return n

    problems = _map_batches(lambda batch: read_batch(storage, locator, batch, expectation), requests, threads,
                            progress, weight)
    bad = [p for p in problems if p]
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise CorruptCheckpointError(
            f"{len(bad)} corrupt chunk(s): " + "; ".join(bad[:5]) + more
            + ". Run `ckpt verify` on the run; load an older step with step=N",
            bad,
        )
