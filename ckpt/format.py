"""The on-storage layout of a run: steps, fragments, array metadata, and the commit point.

```
<run>/<step:012d>/
    <tensor path>/zarr.json, c/...     one zarr v3 array per logical tensor, global shape
    <group>/zarr.json                  intermediate groups
    .fragments/<writer>.json           per writer: every chunk it wrote, size, crc32c
    zarr.json                          root group + consolidated metadata + manifest: LAST
```

The root ``zarr.json`` is the commit point: a step without it does not exist for readers.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import crc32c

from .dtypes import codecs_for, info_by_name
from .errors import CheckpointNotFoundError, CommitError, FormatError
from .manifest import MANIFEST_KEY, ArraySpec, Fragment, Manifest, ManifestError
from .planning import array_metadata, chunk_key
from .storage import Storage

log = logging.getLogger(__name__)

STEP_DIGITS = 12
FRAGMENTS = ".fragments"
META = "zarr.json"


def step_dir(step: int) -> str:
    if isinstance(step, bool) or not isinstance(step, int) or not (0 <= step < 10**STEP_DIGITS):
        raise ValueError(f"step must be an integer in [0, 10**{STEP_DIGITS}), got {step!r}")
    return f"{step:0{STEP_DIGITS}d}"


def parse_step(name: str) -> int | None:
    return int(name) if len(name) == STEP_DIGITS and name.isdigit() else None


def writer_name(rank: int) -> str:
    return f"rank{rank:05d}"


def fragment_path(step: int, writer: str) -> str:
    return f"{step_dir(step)}/{FRAGMENTS}/{writer}.json"


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


# The crc32c of a document's own serialization (without this key) is stored in it, so that a
# bit flip that still parses (a digit of a value, a letter of a name) is caught. The key sits
# in the root group's attributes (zarr readers ignore unknown attributes) and at the top of a
# fragment. Documents written before it have none and are read as before.
SEAL_KEY = "ckpt_crc32c"


def _seal_crc(doc: dict) -> int:
    return crc32c.crc32c(dumps(doc))


def seal_fragment(doc: dict) -> dict:
    doc[SEAL_KEY] = _seal_crc(doc)
    return doc


def seal_root(root: dict) -> dict:
    root["attributes"][SEAL_KEY] = _seal_crc(root)
    return root


# What documents written before seals hold: an unsealed document with anything else is a
# sealed one whose checksum key was damaged.
_UNSEALED_ROOT_ATTRIBUTES = frozenset({MANIFEST_KEY})
_UNSEALED_FRAGMENT_FIELDS = frozenset({"format", "format_version", "step", "save_id", "writer", "created_at", "arrays",
                                       "chunks", "values"})


def check_seal(doc: Any, where: str, *, root: bool) -> None:
    """Raise :class:`FormatError` if ``doc`` carries a checksum that its contents do not match."""
    if not isinstance(doc, dict):
        return
    holder = doc.get("attributes") if root else doc
    if not isinstance(holder, dict):
        return
    if SEAL_KEY not in holder:
        extra = sorted(set(holder) - (_UNSEALED_ROOT_ATTRIBUTES if root else _UNSEALED_FRAGMENT_FIELDS))
        if extra:
            raise FormatError(f"{where}: unknown field(s) {extra} and no checksum; the file is corrupt")
        return
    stored = holder[SEAL_KEY]
    rest = {k: v for k, v in holder.items() if k != SEAL_KEY}
    unsealed = {**doc, "attributes": rest} if root else rest
    try:
        actual = _seal_crc(unsealed)
    except ValueError:  # NaN or other values dumps refuses: not what was written
        actual = None
    if stored != actual:
        raise FormatError(f"{where}: checksum mismatch (stored {stored!r}, contents {actual!r}); the file is corrupt")


def _loads(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{what} is not valid JSON ({e}); the checkpoint is corrupt") from None


def zarr_array_document(spec: ArraySpec) -> dict:
    info = info_by_name(spec.dtype)
    attrs = {MANIFEST_KEY: {"dtype": spec.dtype, "layout": spec.layout}}
    return array_metadata(spec, info.zarr_name, info.fill_value, codecs_for(info), attrs)


def group_document(attributes: dict | None = None) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}


# ---------------------------------------------------------------------------------------------
# Fragments


def array_metadata_path(step: int, spec: ArraySpec) -> str:
    return f"{step_dir(step)}/{spec.path}/{META}"


def write_array_metadata(storage: Storage, step: int, spec: ArraySpec, *, durable: bool = True) -> None:
    storage.write(array_metadata_path(step, spec), [dumps(zarr_array_document(spec))], durable=durable)


def write_fragment(storage: Storage, fragment: Fragment) -> None:
    storage.write_atomic(fragment_path(fragment.step, fragment.writer), dumps(seal_fragment(fragment.to_dict())))


def read_fragment(storage: Storage, step: int, writer: str) -> Fragment:
    path = fragment_path(step, writer)
    data = storage.read(path)
    doc = _loads(data, path)
    check_seal(doc, path, root=False)
    try:
        return Fragment.from_dict(doc)
    except ManifestError as e:
        raise FormatError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Commit


def _check_specs(fragments: Sequence[Fragment]) -> tuple[dict[str, ArraySpec], list[str]]:
    arrays: dict[str, ArraySpec] = {}
    first_by: dict[str, str] = {}
    problems = []
    for frag in fragments:
        for path, spec in frag.arrays.items():
            have = arrays.get(path)
            if have is None:
                arrays[path] = spec
                first_by[path] = frag.writer
            elif (have.shape, have.dtype, have.chunk_shape) != (spec.shape, spec.dtype, spec.chunk_shape):
                problems.append(
                    f"{path!r}: writer {first_by[path]} declares shape {list(have.shape)} {have.dtype} "
                    f"chunks {list(have.chunk_shape)}, writer {frag.writer} declares shape "
                    f"{list(spec.shape)} {spec.dtype} chunks {list(spec.chunk_shape)} (if ranks hold "
                    "different slices of this tensor, declare its layout with ckpt.Sharded or a DTensor)"
                )
    return arrays, problems


def check_coverage(arrays: dict[str, ArraySpec], fragments: Sequence[Fragment]) -> list[str]:
    """Every chunk of every array written exactly once, nothing outside the grid."""
    problems = []
    owner: dict[tuple[str, tuple[int, ...]], str] = {}
    for frag in fragments:
        for path, records in frag.chunks.items():
            spec = arrays.get(path)
            if spec is None:
                problems.append(f"writer {frag.writer} wrote chunks of undeclared array {path!r}")
                continue
            grid = spec.grid_shape
            for rec in records:
                if len(rec.index) != len(grid) or any(not (0 <= i < g) for i, g in zip(rec.index, grid)):
                    problems.append(f"{path!r}: chunk {list(rec.index)} outside the grid {list(grid)}")
                    continue
                key = (path, rec.index)
                if key in owner:
                    problems.append(
                        f"{path!r}: chunk {list(rec.index)} written by both {owner[key]} and {frag.writer}"
                    )
                owner[key] = frag.writer
    written = Counter(p for p, _i in owner)
    for path, spec in arrays.items():
        have = written[path] if spec.num_chunks else 0
        if have != spec.num_chunks:
            problems.append(f"{path!r}: {spec.num_chunks - have} of {spec.num_chunks} chunks not written by any writer")
    return problems


def intermediate_groups(paths: Iterable[str]) -> list[str]:
    groups = set()
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            groups.add("/".join(parts[:i]))
    return sorted(groups)


@dataclass(frozen=True, slots=True)
class CommitOptions:
    check_listing: bool = True  # confirm every recorded chunk is in storage with its size
    threads: int = 16


def commit(
    storage: Storage,
    step: int,
    writers: Sequence[str],
    *,
    save_id: str | None = None,
    library_versions: dict[str, str] | None = None,
    user_metadata: dict[str, Any] | None = None,
    options: CommitOptions = CommitOptions(),
    known: Mapping[str, Fragment] | None = None,
) -> Manifest:
    """Validate the fragments of ``writers`` and write the commit point.

    Raises :class:`CommitError` listing every problem if anything is missing, duplicated or
    inconsistent; in that case nothing becomes visible.

    ``known``: fragments the caller wrote itself in this process (after making their chunks
    durable); they are not read back, and their chunks are not listed again.
    """
    if not writers:
        raise CommitError("commit needs at least one writer")
    sdir = step_dir(step)
    known = dict(known or {})
    to_read = [w for w in writers if w not in known]
    with ThreadPoolExecutor(max_workers=max(1, min(options.threads, len(to_read)))) as pool:
        read = dict(zip(to_read, pool.map(lambda w: _try_read_fragment(storage, step, w), to_read)))
    results = [known[w] if w in known else read[w] for w in writers]
    problems = [r for r in results if isinstance(r, str)]
    fragments = [r for r in results if isinstance(r, Fragment)]
    if problems:
        raise CommitError(f"cannot commit step {step}: " + "; ".join(problems), )
    ids = {f.save_id for f in fragments}
    if save_id is not None and ids != {save_id} or len(ids) > 1:
        raise CommitError(
            f"cannot commit step {step}: fragments come from different saves {sorted(ids)} "
            f"(expected {save_id}); a stale attempt left fragments behind, save the step again"
        )
    if any(f.step != step for f in fragments):
        raise CommitError(f"cannot commit step {step}: a fragment records another step")
    arrays, problems = _check_specs(fragments)
    problems += check_coverage(arrays, fragments)
    if not problems and options.check_listing and to_read:
        problems += _check_listing(storage, step, arrays, [f for f in fragments if f.writer not in known])
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise CommitError(f"cannot commit step {step}: " + "; ".join(problems[:10]) + more)

    # Arrays without chunks (a zero-sized dim) have no first-chunk writer: their metadata is ours.
    empty = [a for a in arrays.values() if a.num_chunks == 0]
    groups = intermediate_groups(arrays)
    array_paths = set(arrays)
    clash = [g for g in groups if g in array_paths]
    if clash:
        raise CommitError(f"cannot commit step {step}: {clash[0]!r} is both a tensor and a group of tensors")
    with ThreadPoolExecutor(max_workers=options.threads) as pool:
        list(pool.map(lambda a: write_array_metadata(storage, step, a), empty))
        list(pool.map(lambda g: storage.write(f"{sdir}/{g}/{META}", [dumps(group_document())]), groups))

    first = fragments[0]
    by_writer = {}
    for frag in fragments[1:]:
        diff = {k: v for k, v in frag.values.items() if first.values.get(k, _MISSING) != v}
        if diff:
            by_writer[frag.writer] = diff
    manifest = Manifest(
        step=step,
        save_id=first.save_id,
        created_at=time.time(),
        writers=tuple(writers),
        arrays=dict(sorted(arrays.items())),
        values=first.values,
        values_by_writer=by_writer,
        library_versions=library_versions or {},
        user_metadata=user_metadata or {},
    )
    consolidated: dict[str, Any] = {g: group_document() for g in groups}
    consolidated.update({p: zarr_array_document(a) for p, a in manifest.arrays.items()})
    root = group_document({MANIFEST_KEY: manifest.to_dict()})
    root["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": consolidated}
    storage.write_atomic(f"{sdir}/{META}", dumps(seal_root(root)))
    return manifest


_MISSING = object()


def _try_read_fragment(storage: Storage, step: int, writer: str) -> Fragment | str:
    try:
        return read_fragment(storage, step, writer)
    except FileNotFoundError:
        return f"writer {writer} has not written its fragment"
    except FormatError as e:
        return str(e)


def _check_listing(storage: Storage, step: int, arrays: dict[str, ArraySpec], fragments: Sequence[Fragment]) -> list[str]:
    files = storage.walk(step_dir(step))
    problems = []
    for frag in fragments:
        for path, records in frag.chunks.items():
            for rec in records:
                key = chunk_key(path, rec.index, arrays[path].chunk_separator)
                size = files.get(key)
                if size != rec.nbytes:
                    what = "missing" if size is None else f"{size} bytes, recorded {rec.nbytes}"
                    problems.append(f"{path!r}: chunk {list(rec.index)} written by {frag.writer} is {what}")
    for path, spec in arrays.items():
        if spec.num_chunks and f"{path}/{META}" not in files:
            problems.append(f"{path!r}: array metadata missing")
    return problems


# ---------------------------------------------------------------------------------------------
# Reading runs


@dataclass(frozen=True, slots=True)
class StepInfo:
    step: int
    committed: bool


def list_steps(storage: Storage) -> list[StepInfo]:
    """Every step directory of the run, oldest first, with whether it is committed."""
    out = []
    for name in storage.list_dir(""):
        step = parse_step(name)
        if step is None:
            continue
        out.append(StepInfo(step, storage.exists(f"{name}/{META}")))
    return sorted(out, key=lambda s: s.step)


def committed_steps(storage: Storage) -> list[int]:
    return [s.step for s in list_steps(storage) if s.committed]


def read_root(storage: Storage, step: int) -> dict:
    path = f"{step_dir(step)}/{META}"
    try:
        data = storage.read(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"no committed checkpoint at step {step} in {storage.url}; `ckpt ls {storage.url}` lists them"
        ) from None
    doc = _loads(data, path)
    check_seal(doc, path, root=True)
    if not isinstance(doc, dict) or doc.get("node_type") != "group" or doc.get("zarr_format") != 3:
        raise FormatError(f"{path} is not a zarr v3 group")
    return doc


def read_manifest(storage: Storage, step: int | None = None) -> Manifest:
    """The manifest of ``step``, or of the newest committed step when ``step`` is None."""
    if step is None:
        steps = committed_steps(storage)
        if not steps:
            raise CheckpointNotFoundError(f"no committed checkpoint in {storage.url}")
        step = steps[-1]
    doc = read_root(storage, step)
    attrs = doc.get("attributes")
    if not isinstance(attrs, dict) or MANIFEST_KEY not in attrs:
        raise FormatError(f"step {step} in {storage.url} has no {MANIFEST_KEY!r} manifest")
    try:
        manifest = Manifest.from_dict(attrs[MANIFEST_KEY])
    except ManifestError as e:
        raise FormatError(f"step {step} in {storage.url}: {e}") from None
    if manifest.step != step:
        raise FormatError(f"step directory {step} holds the manifest of step {manifest.step}")
    return manifest
