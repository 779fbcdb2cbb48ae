"""The one executor: the only place that moves tensor bytes to and from storage.

Writing encodes each chunk with the chunk codec (``ckpt.chunks``: the region's bytes, then
their crc32c); a contiguous full chunk is written straight from the tensor's memory, without a
copy. Reading goes through the restore source's tiers when there are any (``ckpt.restore``),
checks presence, size and checksum of every chunk, and reads a chunk that maps onto a
contiguous region of a CPU destination straight into it. Both run requests in parallel on a
thread pool (file I/O and crc32c release the GIL); memory in flight is bounded by threads x
chunk size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import chunks, layouts
from . import format as fmt
from .chunks import CRC_BYTES
from .gcpause import gc_paused, without_gc
from .layouts import Locator
from .manifest import ChunkRecord, Fragment, Manifest
from .plan import LoadPlan, SavePlan, pack_slots, plan_load, request_nbytes
from .planning import WriteRequest
from .reading import ChunkExpectation, Progress, _map, read_chunks
from .state import decode_value, set_leaf
from .storage import Storage


def chunk_payload(req: WriteRequest) -> tuple[memoryview, torch.Tensor]:
    """The stored bytes of a request's chunk (without checksum), and the tensor that owns them."""
    if req.stored is not None:
        return req.stored
    return chunks.payload(req.tensor, req.slices, req.chunk_shape, ragged=req.ragged)


def write_chunk(storage: Storage, prefix: str, req: WriteRequest, *, durable: bool) -> ChunkRecord:
    data, _keepalive = chunk_payload(req)
    parts, crc = chunks.encode(data)
    storage.write(f"{prefix}/{req.key}", parts, durable=durable)
    return ChunkRecord(index=req.index, nbytes=data.nbytes + CRC_BYTES, crc32c=crc)


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


DEFAULT_IO_THREADS = 8


def write_plan(
    storage: Storage,
    plan: SavePlan,
    *,
    step: int,
    writer: str,
    save_id: str,
    threads: int = DEFAULT_IO_THREADS,
    durable: bool = True,
    progress: Callable[[int], None] | None = None,
    layout: str = "packs",
) -> Fragment:
    """Write this process's chunks, then its fragment (last).

    ``layout="packs"`` (format 3): the chunks go into this writer's pack files at the offsets
    ``ckpt.plan.pack_slots`` fixes; ``"chunks"``: one file per chunk at its zarr key, with the
    array metadata (directly readable by zarr readers; T x N files for T arrays sharded N ways).
    With ``durable``, everything the fragment points to is durable before the fragment is
    written: one barrier for all files where the storage offers one (``Storage.sync``: a
    single ``syncfs`` on Linux), an ``fsync`` per file otherwise.
    """
    if layout not in ("packs", "chunks"):
        raise ValueError(f"layout must be 'packs' or 'chunks', got {layout!r}")
    defer = durable and storage.can_sync
    per_file = durable and not defer
    prefix = fmt.step_dir(step)
    packs: tuple[str, ...] = ()
    if layout == "chunks":
        # Many small files: in parallel, not one after the other.
        _map(lambda spec: fmt.write_array_metadata(storage, step, spec, durable=per_file), plan.metadata,
             threads, None, lambda _s: 0)
        records = write_chunks(storage, prefix, plan.requests, threads=threads, durable=per_file, progress=progress)
        paths = [fmt.array_metadata_path(step, spec) for spec in plan.metadata]
        paths += [f"{prefix}/{r.key}" for r in plan.requests]
    else:
        packs, records, paths = _write_packs(storage, step, writer, plan.requests, threads=threads,
                                             durable=per_file, progress=progress)
    if defer and paths:  # a writer with nothing to write (all its tensors written by other replicas) skips it
        storage.sync(paths)
    fragment = Fragment(
        step=step,
        save_id=save_id,
        writer=writer,
        created_at=time.time(),
        arrays=plan.arrays,
        chunks={p: tuple(r) for p, r in records.items()},
        values=plan.values,
        packs=packs,
        containers=plan.containers,
    )
    fmt.write_fragment(storage, fragment)
    return fragment


def _write_packs(storage: Storage, step: int, writer: str, requests: Sequence[WriteRequest], *, threads: int,
                 durable: bool, progress: Progress | None) -> tuple[tuple[str, ...], dict[str, list[ChunkRecord]],
                                                                      list[str]]:
    """Every chunk into this writer's packs: each pack one object, written by one thread."""
    if not requests:
        return (), {}, []
    slots, sizes = pack_slots(requests, threads=threads)
    names = tuple(layouts.pack_name(writer, n) for n in range(len(sizes)))
    by_pack: list[list[int]] = [[] for _ in sizes]
    for i, slot in enumerate(slots):
        by_pack[slot.pack].append(i)
    records: list[tuple[int, int, int, int] | None] = [None] * len(requests)

    def write_pack(n: int) -> None:
        parts: list[Any] = []
        keep: list[torch.Tensor] = []
        pos = 0
        for i in by_pack[n]:
            req, slot = requests[i], slots[i]
            if slot.offset > pos:
                parts.append(bytes(slot.offset - pos))
            data, owner = chunk_payload(req)
            keep.append(owner)
            encoded, crc = chunks.encode(data)
            parts += encoded
            records[i] = (data.nbytes + CRC_BYTES, crc, n, slot.offset)  # records made at the end
            pos = slot.offset + data.nbytes + CRC_BYTES
        storage.write(layouts.pack_path(step, names[n]), parts, durable=durable)
        if progress is not None:
            progress(pos)

    # Weighted by size: packs of a few MiB or more each get a thread of their own (a weight of 0
    # made them one batch, written one after another by the persist thread).
    _map(write_pack, list(range(len(sizes))), threads, None, lambda n: sizes[n])
    out: dict[str, list[ChunkRecord]] = {}
    with gc_paused():  # (made while the packs were written, they outlived collections: see ckpt.gcpause)
        for req, rec in zip(requests, records):
            assert rec is not None
            out.setdefault(req.path, []).append(ChunkRecord(index=req.index, nbytes=rec[0], crc32c=rec[1], pack=rec[2],
                                                            offset=rec[3]))
    return names, out, [layouts.pack_path(step, name) for name in names]


# ---------------------------------------------------------------------------------------------
# Reading


def execute_load(
    storage: Storage,
    state_dict: Any,
    plan: LoadPlan,
    *,
    allow_pickle: bool = False,
    threads: int = DEFAULT_IO_THREADS,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Carry out a load plan: zero the padding it names, read every chunk into its
    destinations, set the non-tensor values."""
    for z in plan.zero:
        z.tensor.detach().narrow(z.dim, z.start, z.length).zero_()
    dtypes: dict[str, torch.dtype] = {}
    expect = {p: ChunkExpectation(dtypes.get(a.dtype) or dtypes.setdefault(a.dtype, getattr(torch, a.dtype)))
              for p, a in plan.arrays.items()}
    locator = Locator(storage, plan.step, plan.layout, plan.arrays)
    will_read = getattr(storage, "will_read", None)  # a restore's tiers (ckpt.restore.RestoreSource)
    if will_read is not None and plan.layout.writer_runs:  # packs, and shards consolidated since runs are kept
        will_read(plan.step, locator.writers_of((r.path, r.index) for r in plan.requests))
    try:
        read_chunks(storage, locator, plan.requests, lambda r: expect[r.path],
                    threads=threads, progress=progress)
    finally:  # the host-to-device copies were queued without waiting
        for device in {t.tensor.device for r in plan.requests for t in r.targets if t.tensor.device.type == "cuda"}:
            torch.cuda.synchronize(device)
    for path, encoded in plan.values.items():
        set_leaf(state_dict, path, decode_value(encoded, allow_pickle=allow_pickle, where=path))


@without_gc
def load_step(storage: Storage, state_dict: Any, step: int, *, rank: int = 0, writer: str | None = None,
              strict: bool = True, allow_cast: bool = False, allow_pickle: bool = False,
              threads: int = DEFAULT_IO_THREADS, progress: Callable[[int], None] | None = None) -> None:
    """Load committed ``step`` into ``state_dict`` in place: its manifest, a load plan for this
    process's layout, the plan carried out. ``writer``: this process's writer name (per-writer
    values saved under the same world size come back to the same rank)."""
    manifest = fmt.read_manifest(storage, step)
    plan = plan_load(state_dict, manifest, rank=rank, writer=writer, strict=strict, allow_cast=allow_cast,
                     writer_values=writer_values(storage, manifest, writer))
    execute_load(storage, state_dict, plan, allow_pickle=allow_pickle, threads=threads, progress=progress)


def writer_values(storage: Storage, manifest: Manifest, writer: str | None) -> dict[str, Any] | None:
    """This writer's own copies of the values that differ between writers (format 3 keeps them
    in the writer's fragment, read only by its own reader); None when there are none to read."""
    if not manifest.varying_values or writer is None or writer not in manifest.writers:
        return None
    frag = fmt.read_fragment(storage, manifest.step, writer, records=False)
    return {k: frag.values[k] for k in manifest.varying_values if k in frag.values}
