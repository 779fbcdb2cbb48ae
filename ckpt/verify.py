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
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch

from . import chunks
from . import format as fmt
from .chunks import CRC_BYTES
from .dtypes import info_by_name
from .errors import CkptError, FormatError, StorageError
from .manifest import MANIFEST_KEY, ArraySpec, ChunkRecord, Fragment, Manifest, ManifestError
from .planning import chunk_key
from .storage import Storage

Progress = Callable[[int], None]

# Problem kinds, stable strings for scripts that read ``ckpt verify --json``.
MISSING = "missing"  # a chunk, array metadata, group metadata or fragment is absent
TRUNCATED = "truncated"  # a chunk shorter than a full chunk + checksum
SIZE = "size"  # a chunk longer than expected, or a fragment records another size
CHECKSUM = "checksum"  # the stored crc32c does not match the data
RECORDED_CRC = "recorded_crc"  # data and stored crc agree, but not with the writer's record
UNRECORDED = "unrecorded"  # no writer's fragment records the chunk
DUPLICATE = "duplicate"  # two writers' fragments record the chunk
OUTSIDE = "outside"  # a fragment records a chunk outside the grid or of an unknown array
METADATA = "metadata"  # a zarr.json that is unreadable or disagrees with the manifest
FRAGMENT = "fragment"  # a fragment that is unreadable or belongs to another save
MANIFEST = "manifest"  # the commit point itself is unreadable
UNREADABLE = "unreadable"  # storage refused to read an object (permission, not a file, ...)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a checkpoint; ``message`` is a whole sentence naming what and where."""

    kind: str
    message: str
    path: str | None = None  # tensor path, when the problem concerns one tensor
    index: tuple[int, ...] | None = None  # chunk index, when it concerns one chunk
    key: str | None = None  # storage key relative to the step directory
    writer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "tensor": self.path,
            "chunk": list(self.index) if self.index is not None else None,
            "key": self.key,
            "writer": self.writer,
        }


@dataclass(slots=True)
class VerifyReport:
    """What :func:`verify_step` checked and every problem it found (empty when all is well)."""

    step: int
    arrays: int = 0
    chunks: int = 0
    bytes: int = 0
    writers: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "ok": self.ok,
            "arrays": self.arrays,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "writers": self.writers,
            "problems": [p.to_dict() for p in self.problems],
        }


def _chunk_name(index: tuple[int, ...]) -> str:
    return ".".join(map(str, index)) or "()"


def _chunk_problem(kind: str, spec: ArraySpec, index: tuple[int, ...], what: str, writer: str | None = None) -> Problem:
    key = chunk_key(spec.path, index, spec.chunk_separator)
    return Problem(
        kind, f"tensor {spec.path!r} chunk {_chunk_name(index)} ({key}): {what}", spec.path, index, key, writer
    )


def _normalized(doc: Any) -> Any:
    """``doc`` as it reads back from JSON (tuples become lists, ...), for comparisons."""
    return json.loads(fmt.dumps(doc))


# ---------------------------------------------------------------------------------------------
# Metadata


def _read_json(storage: Storage, key: str) -> tuple[Any, str | None, str]:
    """(document, None, "") or (None, problem kind, description)."""
    try:
        data = storage.read(key)
    except FileNotFoundError:
        return None, MISSING, "missing"
    except StorageError:
        raise
    except OSError as e:
        return None, UNREADABLE, f"unreadable ({e})"
    try:
        return json.loads(data), None, ""
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return None, METADATA, f"not valid JSON ({e})"


# Fields of an array's zarr.json that must agree with the manifest. The layout description
# in its attributes is informational and comes from whichever writer wrote the file.
_ARRAY_FIELDS = ("zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding",
                 "fill_value", "codecs")


def _array_doc_differences(have: Any, want: dict, layout: Any = None) -> list[str]:
    """What differs between an array's ``zarr.json`` and the manifest; ``layout``: the layout
    description the array's metadata writer declared (None: not checked)."""
    if not isinstance(have, dict):
        return [f"expected a JSON object, found {type(have).__name__}"]
    out = [f"{f} is {have.get(f)!r}, the manifest says {want[f]!r}" for f in _ARRAY_FIELDS if have.get(f) != want[f]]
    extra = sorted(set(have) - set(want))
    if extra:
        out.append(f"unexpected field(s) {extra}")
    attrs = have.get("attributes")
    if isinstance(attrs, dict) and set(attrs) != set(want["attributes"]):
        out.append(f"attributes are {sorted(attrs)}, expected {sorted(want['attributes'])}")
    meta = attrs.get(MANIFEST_KEY) if isinstance(attrs, dict) else None
    if isinstance(meta, dict) and set(meta) != {"dtype", "layout"}:
        out.append(f"attributes.{MANIFEST_KEY} has fields {sorted(meta)}, expected ['dtype', 'layout']")
    if layout is not None and isinstance(meta, dict) and _normalized(meta.get("layout")) != _normalized(layout):
        out.append(f"attributes.{MANIFEST_KEY}.layout is {meta.get('layout')!r}, its writer declared {layout!r}")
    attrs = have.get("attributes")
    got_dtype = attrs.get(MANIFEST_KEY, {}).get("dtype") if isinstance(attrs, dict) and isinstance(
        attrs.get(MANIFEST_KEY), dict) else None
    want_dtype = want["attributes"][MANIFEST_KEY]["dtype"]
    if got_dtype != want_dtype:
        out.append(f"attributes.{MANIFEST_KEY}.dtype is {got_dtype!r}, the manifest says {want_dtype!r}")
    return out


def _check_metadata(storage: Storage, step: int, manifest: Manifest, root: dict,
                    layouts: dict[str, Any] | None = None) -> list[Problem]:
    sdir = fmt.step_dir(step)
    problems: list[Problem] = []
    consolidated = root.get("consolidated_metadata")
    entries = consolidated.get("metadata") if isinstance(consolidated, dict) else None
    if not isinstance(entries, dict):
        problems.append(Problem(METADATA, f"{fmt.META}: consolidated metadata missing or malformed", key=fmt.META))
        entries = None
    groups = sorted({"/".join(p.split("/")[:i]) for p in manifest.arrays for i in range(1, p.count("/") + 1)})
    for path, spec in manifest.arrays.items():
        try:
            want = _normalized(fmt.zarr_array_document(spec))
        except CkptError as e:  # unknown dtype name in the manifest
            problems.append(Problem(METADATA, f"tensor {path!r}: {e}", path))
            continue
        if entries is not None:
            diffs = _array_doc_differences(entries.get(path), want) if path in entries else ["no entry"]
            for d in diffs:
                problems.append(Problem(METADATA, f"tensor {path!r}: consolidated metadata in {fmt.META}: {d}",
                                        path, key=fmt.META))
        key = f"{path}/{fmt.META}"
        doc, kind, what = _read_json(storage, f"{sdir}/{key}")
        if kind is not None:
            problems.append(Problem(kind, f"tensor {path!r}: array metadata {key} {what}", path, key=key))
            continue
        for d in _array_doc_differences(doc, want, (layouts or {}).get(path)):
            problems.append(Problem(METADATA, f"tensor {path!r}: array metadata {key}: {d}", path, key=key))
    for g in groups:
        key = f"{g}/{fmt.META}"
        doc, kind, what = _read_json(storage, f"{sdir}/{key}")
        if kind is None and doc != fmt.group_document():  # intermediate groups are always this document
            kind, what = METADATA, f"is not the zarr group document {fmt.group_document()} ({doc!r})"
        if kind is not None:
            problems.append(Problem(kind, f"group {g!r}: metadata {key} {what}", key=key))
    return problems


def _read_fragments(
    storage: Storage, step: int, manifest: Manifest, threads: int
) -> tuple[list[Fragment], list[Problem]]:
    def one(writer: str) -> Fragment | Problem:
        key = fmt.fragment_path(step, writer).split("/", 1)[1]
        try:
            frag = fmt.read_fragment(storage, step, writer)
        except FileNotFoundError:
            return Problem(FRAGMENT, f"fragment of writer {writer} ({key}) is missing", key=key, writer=writer)
        except FormatError as e:
            return Problem(FRAGMENT, f"fragment of writer {writer} ({key}) is unreadable: {e}", key=key, writer=writer)
        except StorageError:
            raise
        except OSError as e:
            return Problem(UNREADABLE, f"fragment of writer {writer} ({key}) is unreadable: {e}", key=key,
                           writer=writer)
        if frag.step != step or frag.save_id != manifest.save_id or frag.writer != writer:
            return Problem(
                FRAGMENT,
                f"fragment of writer {writer} ({key}) belongs to another save (step {frag.step}, save "
                f"{frag.save_id}, writer {frag.writer}; the manifest says step {step}, save {manifest.save_id})",
                key=key, writer=writer,
            )
        return frag

    if not manifest.writers:
        return [], []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(manifest.writers)))) as pool:
        results = list(pool.map(one, manifest.writers))
    return [r for r in results if isinstance(r, Fragment)], [r for r in results if isinstance(r, Problem)]


def _recorded_chunks(
    manifest: Manifest, fragments: list[Fragment]
) -> tuple[dict[tuple[str, tuple[int, ...]], tuple[str, ChunkRecord]], list[Problem]]:
    """Which writer recorded each chunk; problems for duplicates and records off the grid."""
    owner: dict[tuple[str, tuple[int, ...]], tuple[str, ChunkRecord]] = {}
    problems: list[Problem] = []
    for frag in fragments:
        for path, records in frag.chunks.items():
            spec = manifest.arrays.get(path)
            for rec in records:
                if spec is None:
                    problems.append(Problem(
                        OUTSIDE, f"writer {frag.writer} recorded chunk {_chunk_name(rec.index)} of tensor {path!r}, "
                        "which the manifest does not have", path, rec.index, writer=frag.writer))
                    continue
                grid = spec.grid_shape
                if len(rec.index) != len(grid) or any(not 0 <= i < g for i, g in zip(rec.index, grid)):
                    problems.append(Problem(
                        OUTSIDE, f"tensor {path!r} chunk {_chunk_name(rec.index)}: writer {frag.writer} recorded "
                        f"it, but it lies outside the chunk grid {list(grid)}", path, rec.index, writer=frag.writer))
                    continue
                have = owner.get((path, rec.index))
                if have is not None:
                    problems.append(_chunk_problem(
                        DUPLICATE, spec, rec.index, f"recorded by both {have[0]} and {frag.writer}", frag.writer))
                    continue
                owner[(path, rec.index)] = (frag.writer, rec)
    return owner, problems


# ---------------------------------------------------------------------------------------------
# Chunks


@dataclass(frozen=True, slots=True)
class _ChunkCheck:
    spec: ArraySpec
    index: tuple[int, ...]
    nbytes: int  # data bytes, without the checksum
    record: ChunkRecord | None
    writer: str | None


def _check_chunk(storage: Storage, prefix: str, c: _ChunkCheck) -> Problem | None:
    want = c.nbytes + CRC_BYTES
    key = f"{prefix}/{chunk_key(c.spec.path, c.index, c.spec.chunk_separator)}"
    buf = torch.empty(c.nbytes, dtype=torch.uint8)
    try:
        read = chunks.read_chunk(storage, key, memoryview(buf.numpy()))
    except FileNotFoundError:
        return _chunk_problem(MISSING, c.spec, c.index, "missing", c.writer)
    except EOFError:
        size = storage.size(key)
        got = f"{size} bytes" if size is not None else "shorter"
        return _chunk_problem(TRUNCATED, c.spec, c.index, f"truncated: {got}, expected {want}", c.writer)
    except StorageError:
        raise
    except OSError as e:
        return _chunk_problem(UNREADABLE, c.spec, c.index, f"unreadable: {e}", c.writer)
    if read.total != want:
        return _chunk_problem(SIZE, c.spec, c.index, f"{read.total} bytes, expected {want}", c.writer)
    if read.actual_crc != read.stored_crc:
        return _chunk_problem(
            CHECKSUM, c.spec, c.index,
            f"checksum mismatch (stored {read.stored_crc:#010x}, data {read.actual_crc:#010x})", c.writer)
    if c.record is not None and c.record.crc32c != read.stored_crc:
        return _chunk_problem(
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
    problems: list[Problem], missing_writers: set[str],
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
                problems.append(_chunk_problem(UNRECORDED, spec, index, f"no writer's fragment records it{why}"))
            elif rec.nbytes != nbytes + CRC_BYTES:
                problems.append(_chunk_problem(
                    SIZE, spec, index, f"writer {writer} recorded {rec.nbytes} bytes, a full chunk is "
                    f"{nbytes + CRC_BYTES}", writer))
            yield _ChunkCheck(spec, index, nbytes, rec, writer)


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
    fragments, frag_problems = _read_fragments(storage, step, manifest, threads)
    # An array's zarr.json is written by the writer of its first chunk (by the committer, from
    # the manifest, when it has none): its layout description is that writer's.
    layouts: dict[str, Any] = {p: a.layout for p, a in manifest.arrays.items()}
    for frag in fragments:
        for path, records in frag.chunks.items():
            spec = frag.arrays.get(path)
            if spec is not None and any(not any(r.index) for r in records):
                layouts[path] = spec.layout
    missing_writers = {p.writer for p in frag_problems if p.writer}
    if missing_writers:  # the writer of an array's metadata may be among them: do not guess
        layouts = {}
    problems = _check_metadata(storage, step, manifest, root, layouts)
    problems += frag_problems
    owner, record_problems = _recorded_chunks(manifest, fragments)
    problems += record_problems
    prefix = fmt.step_dir(step)
    chunk_problems: list[Problem] = []
    checks = _chunk_checks(manifest, owner, chunk_problems, missing_writers)

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
]
