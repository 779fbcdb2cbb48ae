"""The one place that moves tensor bytes to and from storage.

Writing a chunk stores the raw little-endian bytes of the region followed by the crc32c of
those bytes (zarr v3's ``bytes`` + ``crc32c`` codecs); a contiguous full chunk is written
straight from the tensor's memory, without a copy. Reading checks presence, size and
checksum of every chunk, and reads a chunk that maps onto a contiguous region of a CPU
destination straight into it. Both run requests in parallel on a thread pool (file I/O and
crc32c release the GIL); memory in flight is bounded by threads x chunk size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import crc32c
import torch

from .errors import CorruptCheckpointError
from .manifest import ChunkRecord
from .planning import ReadRequest, WriteRequest
from .storage import Storage

Progress = Callable[[int], None]
CRC_BYTES = 4


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def chunk_payload(req: WriteRequest) -> tuple[memoryview, torch.Tensor]:
    """The stored bytes of a chunk (without checksum), and the tensor that owns them."""
    region = req.tensor.detach()[req.slices]
    if region.device.type != "cpu":
        region = region.cpu()
    if req.ragged:
        # zarr stores edge chunks full-size; the part outside the array is fill (zeros).
        padded = torch.zeros(req.chunk_shape, dtype=region.dtype)
        padded[tuple(slice(0, s.stop - s.start) for s in req.slices)] = region
        region = padded
    elif not region.is_contiguous():
        region = region.contiguous()
    return _as_bytes(region), region


def write_chunk(storage: Storage, prefix: str, req: WriteRequest, *, durable: bool) -> ChunkRecord:
    data, _keepalive = chunk_payload(req)
    crc = crc32c.crc32c(data)
    storage.write(f"{prefix}/{req.key}", [data, crc.to_bytes(CRC_BYTES, "little")], durable=durable)
    return ChunkRecord(index=req.index, nbytes=data.nbytes + CRC_BYTES, crc32c=crc)


def _map(fn: Callable, items: Sequence, threads: int, progress: Progress | None, weight: Callable) -> list:
    if not items:
        return []
    if threads <= 1 or len(items) == 1:
        out = []
        for it in items:
            out.append(fn(it))
            if progress:
                progress(weight(it))
        return out
    with ThreadPoolExecutor(max_workers=min(threads, len(items)), thread_name_prefix="ckpt-io") as pool:
        futures = [pool.submit(fn, it) for it in items]
        out = []
        try:
            for it, f in zip(items, futures):
                out.append(f.result())
                if progress:
                    progress(weight(it))
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return out


def request_nbytes(req: WriteRequest | ReadRequest, itemsize: int) -> int:
    return math.prod(req.chunk_shape) * itemsize


def write_chunks(
    storage: Storage,
    prefix: str,
    requests: Sequence[WriteRequest],
    *,
    threads: int,
    durable: bool = True,
    progress: Progress | None = None,
) -> dict[str, list[ChunkRecord]]:
    """Write every chunk; returns the records per array path."""
    records = _map(
        lambda r: write_chunk(storage, prefix, r, durable=durable),
        requests,
        threads,
        progress,
        lambda r: request_nbytes(r, r.tensor.element_size()),
    )
    out: dict[str, list[ChunkRecord]] = {}
    for req, rec in zip(requests, records):
        out.setdefault(req.path, []).append(rec)
    return out


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True, slots=True)
class ChunkExpectation:
    """What a reader knows of a chunk before reading it."""

    dtype: torch.dtype
    expected_crc: int | None = None  # from the writer's fragment, when the reader has it


def _fast_target(req: ReadRequest, dtype: torch.dtype) -> torch.Tensor | None:
    """The destination region when the whole chunk maps onto contiguous CPU memory of it."""
    if len(req.targets) != 1:
        return None
    t = req.targets[0]
    if t.tensor.device.type != "cpu" or t.tensor.dtype != dtype:
        return None
    if any(s.start != 0 or s.stop != c for s, c in zip(t.src, req.chunk_shape)):
        return None
    region = t.tensor.detach()[t.dst]
    return region if region.is_contiguous() else None


def read_chunk(storage: Storage, prefix: str, req: ReadRequest, exp: ChunkExpectation) -> str | None:
    """Read one chunk into its targets; returns a problem description instead of raising."""
    itemsize = exp.dtype.itemsize
    nbytes = math.prod(req.chunk_shape) * itemsize
    where = f"tensor {req.path!r} chunk {'.'.join(map(str, req.index)) or '()'} ({req.key})"
    fast = _fast_target(req, exp.dtype)
    crc_buf = bytearray(CRC_BYTES)
    if fast is not None:
        data = _as_bytes(fast)
        chunk = None
    else:
        chunk = torch.empty(nbytes, dtype=torch.uint8)
        data = memoryview(chunk.numpy())
    try:
        total, actual = storage.read_into_crc(f"{prefix}/{req.key}", data, memoryview(crc_buf))
    except FileNotFoundError:
        return f"{where}: missing"
    except EOFError:
        return f"{where}: truncated (shorter than {nbytes + CRC_BYTES} bytes)"
    if total != nbytes + CRC_BYTES:
        return f"{where}: {total} bytes, expected {nbytes + CRC_BYTES}"
    stored = int.from_bytes(crc_buf, "little")
    if actual != stored:
        return f"{where}: checksum mismatch (stored {stored:#010x}, data {actual:#010x})"
    if exp.expected_crc is not None and stored != exp.expected_crc:
        return f"{where}: not the chunk its writer recorded (crc {stored:#010x}, recorded {exp.expected_crc:#010x})"
    if chunk is not None:
        values = chunk.view(exp.dtype).reshape(req.chunk_shape)
        for t in req.targets:
            t.tensor.detach()[t.dst].copy_(values[t.src])
    return None


def read_chunks(
    storage: Storage,
    prefix: str,
    requests: Sequence[ReadRequest],
    expectation: Callable[[ReadRequest], ChunkExpectation],
    *,
    threads: int,
    progress: Progress | None = None,
) -> None:
    """Read every chunk into its destinations; raises one error listing every bad chunk."""
    problems = _map(
        lambda r: read_chunk(storage, prefix, r, expectation(r)),
        requests,
        threads,
        progress,
        lambda r: request_nbytes(r, expectation(r).dtype.itemsize),
    )
    bad = [p for p in problems if p]
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise CorruptCheckpointError(
            f"{len(bad)} corrupt chunk(s): " + "; ".join(bad[:5]) + more
            + ". Run `ckpt verify` on the run; load an older step with step=N",
            bad,
        )
