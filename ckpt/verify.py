"""Checking a stored checkpoint end to end, without loading it into a model.

:func:`verify_step` reads every chunk of every array of one step and checks, for each:

- it is present and has exactly the size of a full chunk plus its 4-byte checksum;
- the crc32c stored after the data matches the data;
- that crc equals the one its writer recorded in its fragment (so a chunk swapped for another
  valid chunk, or left over from another attempt, is caught);
- exactly one writer's fragment records it, with the size the array's grid implies.

It also checks that the commit point parses, that its consolidated metadata agrees with the
manifest, that every array's ``zarr.json`` (and every intermediate group's) is present and
agrees with the manifest, and that every writer's fragment is present, parses and belongs to
this save. Every problem is collected (nothing stops at the first) and names the tensor and
the chunk it concerns.

Chunks are read on a thread pool with a bounded window of requests in flight; each request
owns one chunk-sized buffer while it runs, so memory is at most ``threads`` x the largest
chunk.

The checks of the documents (commit point, ``zarr.json`` files, fragments, which writer
recorded which chunk) live in :mod:`ckpt.verify_metadata`; the problem kinds, :class:`Problem`
and :class:`VerifyReport` in :mod:`ckpt.verify_report`, and are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch

from . import chunks, layouts
from . import format as fmt
from .chunks import CRC_BYTES
from .dtypes import info_by_name
from .errors import CkptError, FormatError, StorageError
from .layouts import Location
from .manifest import MANIFEST_KEY, ArraySpec, ChunkRecord, Manifest, ManifestError
from .planning import chunk_key
from .storage import Storage
from .verify_metadata import check_metadata, read_fragments, recorded_chunks
from .verify_report import (
    CHECKSUM,
    DUPLICATE,
    FRAGMENT,
    MANIFEST,
    METADATA,
    MISSING,
    OUTSIDE,
    RECORDED_CRC,
    SIZE,
    TRUNCATED,
    UNREADABLE,
    UNRECORDED,
    Problem,
    VerifyReport,
    chunk_problem,
)

Progress = Callable[[int], None]


# ---------------------------------------------------------------------------------------------
# Chunks


@dataclass(frozen=True, slots=True)
class _ChunkCheck:
    spec: ArraySpec
    index: tuple[int, ...]
    nbytes: int  # data bytes, without the checksum
    record: ChunkRecord | None
    writer: str | None
    location: Location | None = None  # inside a pack or a shard; None: the object at its key


def _check_chunk(storage: Storage, prefix: str, c: _ChunkCheck) -> Problem | None:
    want = c.nbytes + CRC_BYTES
    key = f"{prefix}/{chunk_key(c.spec.path, c.index, c.spec.chunk_separator)}"
    buf = torch.empty(c.nbytes, dtype=torch.uint8)
    loc = c.location
    try:
        if loc is None:
            read = chunks.read_chunk(storage, key, memoryview(buf.numpy()))
        else:
            read = chunks.read_chunk(storage, loc.path, memoryview(buf.numpy()), offset=loc.offset)
    except FileNotFoundError:
        where = "" if loc is None else f" ({loc.path.split('/', 1)[-1]} is missing)"
        return chunk_problem(MISSING, c.spec, c.index, f"missing{where}", c.writer)
    except EOFError:
        if loc is not None:
            size = storage.size(loc.path)
            return chunk_problem(TRUNCATED, c.spec, c.index,
                                 f"truncated: {loc.path.split('/', 1)[-1]} has {size} bytes, the chunk ends at "
                                 f"{(loc.offset or 0) + want}", c.writer)
        size = storage.size(key)
        got = f"{size} bytes" if size is not None else "shorter"
        return chunk_problem(TRUNCATED, c.spec, c.index, f"truncated: {got}, expected {want}", c.writer)
    except StorageError:
        raise
    except OSError as e:
        return chunk_problem(UNREADABLE, c.spec, c.index, f"unreadable: {e}", c.writer)
    if read.total != want:
        return chunk_problem(SIZE, c.spec, c.index, f"{read.total} bytes, expected {want}", c.writer)
    if read.actual_crc != read.stored_crc:
        return chunk_problem(
            CHECKSUM, c.spec, c.index,
            f"checksum mismatch (stored {read.stored_crc:#010x}, data {read.actual_crc:#010x})", c.writer)
    if c.record is not None and c.record.crc32c != read.stored_crc:
        return chunk_problem(
            RECORDED_CRC, c.spec, c.index,
            f"not the chunk writer {c.writer} recorded (crc {read.stored_crc:#010x}, recorded {c.record.crc32c:#010x})",
            c.writer)
    return None


def bounded_map(fn: Callable[[Any], Any], items: Iterable[Any], *, threads: int) -> Iterator[Any]:
    """``fn`` over ``items`` on ``threads`` threads, at most ``2 x threads`` submitted at once.

    Results come in completion order. Items are pulled lazily, so an iterable of millions of
    chunks never becomes millions of pending futures.
    """
    it = iter(items)
    window = max(1, threads) * 2
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="ckpt-verify") as pool:
        pending: set[Future] = set()
        try:
            for item in it:
                pending.add(pool.submit(fn, item))
                if len(pending) >= window:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        yield f.result()
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        finally:
            for f in pending:
                f.cancel()


def _chunk_checks(
    manifest: Manifest, owner: dict[tuple[str, tuple[int, ...]], tuple[str, ChunkRecord]],
    problems: list[Problem], missing_writers: set[str], packs: dict[str, tuple[str, ...]] | None = None,
) -> Iterator[_ChunkCheck]:
    import itertools

    for path, spec in manifest.arrays.items():
        try:
            itemsize = info_by_name(spec.dtype).itemsize
        except CkptError:
            continue  # reported by the metadata check
        nbytes = math.prod(spec.chunk_shape) * itemsize
        for index in itertools.product(*(range(g) for g in spec.grid_shape)):
            writer, rec = owner.get((path, index), (None, None))
            if rec is None:
                why = (f"; the fragment of {', '.join(sorted(missing_writers))} that may have recorded it is "
                       "missing or unreadable") if missing_writers else ""
                problems.append(chunk_problem(UNRECORDED, spec, index, f"no writer's fragment records it{why}"))
            elif rec.nbytes != nbytes + CRC_BYTES:
                problems.append(chunk_problem(
                    SIZE, spec, index, f"writer {writer} recorded {rec.nbytes} bytes, a full chunk is "
                    f"{nbytes + CRC_BYTES}", writer))
            loc = None
            if manifest.layout == layouts.SHARDS:
                loc = Location(f"{fmt.step_dir(manifest.step)}/{layouts.shard_key(spec)}",
                               layouts.linear_index(spec, index) * (nbytes + CRC_BYTES))
            elif manifest.layout == layouts.PACKS:
                names = (packs or {}).get(writer or "", ())
                if rec is None or rec.pack is None or rec.pack >= len(names):
                    if rec is not None:
                        problems.append(chunk_problem(UNRECORDED, spec, index,
                                                      f"writer {writer} recorded it in no pack", writer))
                    continue
                loc = Location(layouts.pack_path(manifest.step, names[rec.pack]), rec.offset)
            yield _ChunkCheck(spec, index, nbytes, rec, writer, loc)


def verify_manifest(
    storage: Storage,
    manifest: Manifest,
    root: dict,
    *,
    threads: int = 8,
    progress: Progress | None = None,
) -> VerifyReport:
    """Verify a step whose commit point has been read (``root``) and parsed (``manifest``)."""
    step = manifest.step
    report = VerifyReport(step=step, arrays=len(manifest.arrays), writers=len(manifest.writers))
    fragments, frag_problems = read_fragments(storage, step, manifest, threads)
    # An array's zarr.json is written by the writer of its first chunk (by the committer, from
    # the manifest, when it has none): its layout description is that writer's.
    array_layouts: dict[str, Any] = {p: a.layout for p, a in manifest.arrays.items()}
    for frag in fragments:
        for path, records in frag.chunks.items():
            spec = frag.arrays.get(path)
            if spec is not None and any(not any(r.index) for r in records):
                array_layouts[path] = spec.layout
    missing_writers = {p.writer for p in frag_problems if p.writer}
    if missing_writers:  # the writer of an array's metadata may be among them: do not guess
        array_layouts = {}
    problems = check_metadata(storage, step, manifest, root, array_layouts)
    problems += frag_problems
    owner, record_problems = recorded_chunks(manifest, fragments)
    problems += record_problems
    prefix = fmt.step_dir(step)
    chunk_problems: list[Problem] = []
    packs = {f.writer: f.packs for f in fragments}
    if manifest.layout == layouts.SHARDS:
        problems += _check_shard_indexes(storage, manifest)
    checks = _chunk_checks(manifest, owner, chunk_problems, missing_writers, packs)

    def run(c: _ChunkCheck) -> tuple[_ChunkCheck, Problem | None]:
        return c, _check_chunk(storage, prefix, c)

    for c, problem in bounded_map(run, checks, threads=threads):
        report.chunks += 1
        report.bytes += c.nbytes + CRC_BYTES
        if problem is not None:
            chunk_problems.append(problem)
        if progress is not None:
            progress(c.nbytes + CRC_BYTES)
    problems += chunk_problems
    report.problems = sorted(problems, key=lambda p: (p.path or "", p.index or (), p.kind, p.message))
    return report


def _check_shard_indexes(storage: Storage, manifest: Manifest) -> list[Problem]:
    """Each shard ends with the index zarr readers use: (offset, nbytes) of every chunk, in
    row-major order, and the index's own crc32c."""
    import struct

    import crc32c

    problems = []
    for spec in manifest.arrays.values():
        if not spec.num_chunks:
            continue
        try:
            stride = layouts.shard_chunk_nbytes(spec, info_by_name(spec.dtype).itemsize)
        except CkptError:
            continue
        key = f"{fmt.step_dir(manifest.step)}/{layouts.shard_key(spec)}"
        size = storage.size(key)
        n = spec.num_chunks
        want_size = n * stride + layouts.shard_index_nbytes(spec)
        if size is None:
            problems.append(Problem(MISSING, f"tensor {spec.path!r}: shard {layouts.shard_key(spec)} is missing",
                                    spec.path, key=layouts.shard_key(spec)))
            continue
        if size != want_size:
            problems.append(Problem(SIZE, f"tensor {spec.path!r}: shard {layouts.shard_key(spec)} has {size} bytes, "
                                    f"expected {want_size}", spec.path, key=layouts.shard_key(spec)))
            continue
        index = bytearray(layouts.shard_index_nbytes(spec))
        storage.read_range_into(key, n * stride, [memoryview(index)])
        body, crc = bytes(index[:-CRC_BYTES]), int.from_bytes(index[-CRC_BYTES:], "little")
        want = b"".join(struct.pack("<QQ", i * stride, stride) for i in range(n))
        if crc32c.crc32c(body) != crc or body != want:
            problems.append(Problem(METADATA, f"tensor {spec.path!r}: the shard index of {layouts.shard_key(spec)} "
                                    "is damaged (zarr readers would misplace chunks)", spec.path,
                                    key=layouts.shard_key(spec)))
    return problems


def verify_step(
    storage: Storage,
    step: int,
    *,
    threads: int = 8,
    progress: Progress | None = None,
) -> VerifyReport:
    """Verify every chunk and every piece of metadata of committed step ``step``.

    Raises :class:`CheckpointNotFoundError` when the step has no commit point (it does not
    exist for readers; there is nothing to verify), :class:`StorageError` when storage fails
    after retries. Everything wrong with the checkpoint itself, including an unreadable commit
    point, is returned as a problem in the report.
    """
    if threads < 1:
        raise ValueError("threads must be >= 1")
    try:
        root = fmt.read_root(storage, step)
    except FormatError as e:
        return VerifyReport(step=step, problems=[Problem(MANIFEST, f"commit point {fmt.META}: {e}", key=fmt.META)])
    attrs = root.get("attributes")
    try:
        if not isinstance(attrs, dict) or MANIFEST_KEY not in attrs:
            raise ManifestError(f"no {MANIFEST_KEY!r} manifest in its attributes")
        manifest = Manifest.from_dict(attrs[MANIFEST_KEY])
        if manifest.step != step:
            raise ManifestError(f"it holds the manifest of step {manifest.step}")
    except ManifestError as e:
        return VerifyReport(step=step, problems=[Problem(MANIFEST, f"commit point {fmt.META}: {e}", key=fmt.META)])
    return verify_manifest(storage, manifest, root, threads=threads, progress=progress)


def verify_steps(
    storage: Storage, steps: Iterable[int], *, threads: int = 8, progress: Progress | None = None
) -> list[VerifyReport]:
    """:func:`verify_step` for each of ``steps``; a step without a commit point raises."""
    return [verify_step(storage, s, threads=threads, progress=progress) for s in steps]


def step_nbytes(manifest: Manifest) -> int:
    """Bytes :func:`verify_manifest` reads for a manifest (for sizing progress bars)."""
    total = 0
    for spec in manifest.arrays.values():
        try:
            itemsize = info_by_name(spec.dtype).itemsize
        except CkptError:
            continue
        total += spec.num_chunks * (math.prod(spec.chunk_shape) * itemsize + CRC_BYTES)
    return total


__all__ = [
    "Problem",
    "VerifyReport",
    "verify_step",
    "verify_steps",
    "verify_manifest",
    "step_nbytes",
    "bounded_map",
    # problem kinds
    "MISSING",
    "TRUNCATED",
    "SIZE",
    "CHECKSUM",
    "RECORDED_CRC",
    "UNRECORDED",
    "DUPLICATE",
    "OUTSIDE",
    "METADATA",
    "FRAGMENT",
    "MANIFEST",
    "UNREADABLE",
]