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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import crc32c

from .dtypes import codecs_for, info_by_name
from .errors import CheckpointNotFoundError, FormatError
from .gcpause import gc_paused
from .jsondocs import loads as _loads
from .jsondocs import loads_fragment as _loads_fragment
from .manifest import (
    MANIFEST_KEY,
    ArraySpec,
    ChunkRecord,
    Fragment,
    Manifest,
    ManifestError,
    check_tensor_path,
    check_version,
    pack_names,
)
from .manifest import _req as required
from .manifest import writer_name as writer_name  # where the layout of a run is, so is the writer naming
from .storage import Storage

log = logging.getLogger(__name__)

STEP_DIGITS = 12
FRAGMENTS = ".fragments"
PACKS = ".packs"
META = "zarr.json"


def step_dir(step: int) -> str:
    if isinstance(step, bool) or not isinstance(step, int) or not (0 <= step < 10**STEP_DIGITS):
        raise ValueError(f"step must be an integer in [0, 10**{STEP_DIGITS}), got {step!r}")
    return f"{step:0{STEP_DIGITS}d}"


def parse_step(name: str) -> int | None:
    return int(name) if len(name) == STEP_DIGITS and name.isdigit() else None


def fragment_path(step: int, writer: str) -> str:
    return f"{step_dir(step)}/{FRAGMENTS}/{writer}.json"


# New checkpoints use "c.0.1": the chunks of an array are files of one directory.
CHUNK_SEPARATOR = "."


def chunk_key(path: str, index: Sequence[int], separator: str = "/") -> str:
    """Storage key of a chunk: zarr v3's default chunk key encoding."""
    return f"{path}/c{separator}" + separator.join(map(str, index)) if index else f"{path}/c"


def array_metadata(spec: ArraySpec, zarr_dtype: str, fill_value: Any, codecs: list[dict], attributes: dict) -> dict:
    """The array's ``zarr.json`` document."""
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(spec.shape),
        "data_type": zarr_dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(spec.chunk_shape)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": spec.chunk_separator}},
        "fill_value": fill_value,
        "codecs": codecs,
        "attributes": attributes,
        "storage_transformers": [],
    }



def dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


# The crc32c of a document's own serialization (without this key) is stored in it, so that a bit flip
# that still parses (a digit, a letter of a name) is caught. The key sits in the root group's attributes
# (zarr readers ignore unknown attributes) and last in a fragment. Older documents have none.
SEAL_KEY = "ckpt_crc32c"


def seal_fragment(doc: dict) -> dict:
    doc[SEAL_KEY] = crc32c.crc32c(dumps(doc))
    return doc


def seal_root(root: dict) -> dict:
    root["attributes"][SEAL_KEY] = crc32c.crc32c(dumps(root))
    return root


# What documents written before seals hold: an unsealed document with anything else is a
# sealed one whose checksum key was damaged.
_UNSEALED_ROOT_ATTRIBUTES = frozenset({MANIFEST_KEY})
_UNSEALED_FRAGMENT_FIELDS = frozenset({"format", "format_version", "step", "save_id", "writer", "created_at", "arrays",
                                       "chunks", "chunk_table", "values", "packs"})


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
        actual = crc32c.crc32c(dumps(unsealed))
    except ValueError:  # NaN or other values dumps refuses: not what was written
        actual = None
    if stored != actual:
        raise FormatError(f"{where}: checksum mismatch (stored {stored!r}, contents {actual!r}); the file is corrupt")


_FRAGMENT_SEAL_TAIL = re.compile(rb',"' + SEAL_KEY.encode() + rb'":(\d{1,10})\}\s*$')


def _seal_tail_matches(data: bytes, holder: Any, pattern: re.Pattern, closing: bytes) -> bool:
    tail = data[-48:]
    m = pattern.search(tail)
    if m is None or not isinstance(holder, dict):
        return False
    stored = int(m.group(1))
    if holder.get(SEAL_KEY) != stored:
        return False
    cut = len(data) - len(tail) + m.start()
    return crc32c.crc32c(data[:cut] + closing) == stored


def _fragment_seal_matches(data: bytes, doc: Any) -> bool:
    """The fragment's checksum checked on its bytes as written (the seal is its last field, so the
    sealed serialization is the bytes before it, closed): no second serialization. False when
    the bytes are not laid out so; then :func:`check_seal` decides."""
    return _seal_tail_matches(data, doc, _FRAGMENT_SEAL_TAIL, b"}")


_ROOT_SEAL = b',"' + SEAL_KEY.encode() + b'":'
_ROOT_SEAL_END = re.compile(rb'(\d{1,10})\}(?:\}\s*$|,"consolidated_metadata":)')


def root_seal(data: bytes) -> tuple[int, int, int, bool] | None:
    """A commit point's seal checked on its bytes: (where its member begins, where its digits end,
    its value, whether consolidated zarr metadata follows); None: not at the end, or no match."""
    at = data.rfind(_ROOT_SEAL)
    m = _ROOT_SEAL_END.match(data, at + len(_ROOT_SEAL)) if at >= 0 else None
    if m is None:
        return None
    view, stored = memoryview(data), int(m.group(1))
    if crc32c.crc32c(view[m.end(1):], crc32c.crc32c(view[:at])) != stored:
        return None
    return at, m.end(1), stored, m.group(0).endswith(b'"consolidated_metadata":')


def _root_seal_matches(data: bytes, doc: Any) -> bool:
    """The same for a commit point: the seal is the last attribute, and the attributes are the
    root's last member or come before its consolidated metadata (a commit point of 2,000 arrays
    is checked in 1 ms instead of re-serialized: the sealed serialization is its bytes without
    the seal)."""
    if not isinstance(doc, dict) or not isinstance(holder := doc.get("attributes"), dict):
        return False
    seal = root_seal(data)
    return seal is not None and holder.get(SEAL_KEY) == seal[2]


def zarr_array_document(spec: ArraySpec, *, shards: bool = False) -> dict:
    """An array's ``zarr.json``: chunks as files at their keys, or (``shards``) one shard
    holding every chunk (zarr's ``sharding_indexed`` codec, index at the end)."""
    info = info_by_name(spec.dtype)
    attrs = {MANIFEST_KEY: {"dtype": spec.dtype, "layout": spec.layout}}
    doc = array_metadata(spec, info.zarr_name, info.fill_value, codecs_for(info), attrs)
    if shards:
        # The shard covers whole inner chunks (zarr's sharding codec requires it): at a ragged
        # array edge it extends past the array, as the last chunk of a regular grid does.
        outer = [max(1, g) * c for g, c in zip(spec.grid_shape, spec.chunk_shape)]
        doc["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": outer}}
        doc["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": "/"}}
        doc["codecs"] = [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": list(spec.chunk_shape), "codecs": codecs_for(info),
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end"}}]
    return doc


def group_document(attributes: dict | None = None) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}


# ---------------------------------------------------------------------------------------------
# Fragments


def array_metadata_path(step: int, spec: ArraySpec) -> str:
    return f"{step_dir(step)}/{spec.path}/{META}"


def write_array_metadata(storage: Storage, step: int, spec: ArraySpec, *, durable: bool = True) -> None:
    storage.write(array_metadata_path(step, spec), [dumps(zarr_array_document(spec))], durable=durable)


def write_fragment(storage: Storage, fragment: Fragment) -> None:
    with gc_paused():  # sealed as by seal_fragment (its last field), encoded once
        data = dumps(fragment.to_dict())
        data = data[:-1] + b',"%s":%d}' % (SEAL_KEY.encode(), crc32c.crc32c(data))
    storage.write_atomic(fragment_path(fragment.step, fragment.writer), data)


def read_fragment(storage: Storage, step: int, writer: str, *, records: bool = True) -> Fragment:
    """``records=False``: a committer's read; a fragment of format 4 keeps its chunk records as
    columns only (``Fragment.table``), not as objects. Parsed with the cycle collector paused
    (thousands of containers, none cyclic: a coordinator reading 10,000 fragments paid as much
    in collections as in parsing)."""
    path = fragment_path(step, writer)
    data = storage.read(path)
    with gc_paused():
        doc = _loads_fragment(data, path)
        if not _fragment_seal_matches(data, doc):
            check_seal(doc, path, root=False)
        try:
            return Fragment.from_dict(doc, records=records)
        except ManifestError as e:
            raise FormatError(f"{path}: {e}") from None


def fragment_locations(d: Any) -> tuple[str, tuple[str, ...], dict[str, tuple[ChunkRecord, ...]]]:
    """What a reader needs of a fragment to find its chunks (save id, packs, chunk records),
    without parsing the array declarations (a reader of one writer's chunks at real shapes would
    spend more on those than on the chunks)."""
    where = "fragment"
    if check_version(d, where) >= 4:  # the columns need the declared grids
        frag = Fragment.from_dict(d)
        return frag.save_id, frag.packs, frag.chunks
    packs = pack_names(d, where)
    chunks = {}
    for p, cs in required(d, "chunks", dict, where).items():
        check_tensor_path(p, f"{where}.chunks")
        if not isinstance(cs, list):
            raise ManifestError(f"{where}.chunks[{p!r}]: expected a list")
        recs = tuple(ChunkRecord.from_list(c, f"{where}.chunks[{p!r}]") for c in cs)
        if any(r.pack is not None and r.pack >= len(packs) for r in recs):
            raise ManifestError(f"{where}.chunks[{p!r}]: a pack index beyond the fragment's packs")
        chunks[p] = recs
    return required(d, "save_id", str, where), tuple(packs), chunks


def read_fragment_locations(storage: Storage, step: int, writer: str
                            ) -> tuple[str, tuple[str, ...], dict[str, tuple[ChunkRecord, ...]]]:
    """(save id, packs, chunk records) of a writer's fragment: what a reader needs to find
    its chunks (the fragment's checksum is checked as for :func:`read_fragment`)."""
    path = fragment_path(step, writer)
    doc = _loads(storage.read(path), path)
    check_seal(doc, path, root=False)
    try:
        return fragment_locations(doc)
    except ManifestError as e:
        raise FormatError(f"{path}: {e}") from None


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


def read_root_exists(storage: Storage, step: int) -> bool:
    return storage.exists(f"{step_dir(step)}/{META}")


def committed_steps(storage: Storage) -> list[int]:
    return [s.step for s in list_steps(storage) if s.committed]


def read_root(storage: Storage, step: int, *, zarr_metadata: bool = True) -> dict:
    path = f"{step_dir(step)}/{META}"
    try:
        data = storage.read(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"no committed checkpoint at step {step} in {storage.url}; `ckpt ls {storage.url}` lists them"
        ) from None
    return parse_root(data, path, zarr_metadata=zarr_metadata)


def _without_zarr_metadata(data: bytes, path: str) -> dict | None:
    """A consolidated step's commit point without its consolidated zarr metadata (three quarters
    of its bytes, which only zarr readers and ``verify`` use), when its seal matches its bytes:
    the document up to the seal, closed. None: parse it whole."""
    seal = root_seal(data)
    if seal is None or not seal[3]:
        return None
    doc = _loads(data[:seal[1]] + b"}}", path)
    holder = doc.get("attributes") if isinstance(doc, dict) else None
    return doc if isinstance(holder, dict) and holder.get(SEAL_KEY) == seal[2] else None


def parse_root(data: bytes, path: str, *, zarr_metadata: bool = True) -> dict:
    """A commit point's document from its bytes, its seal checked; ``zarr_metadata=False``: a
    consolidated step's zarr metadata may be left out (a reader of the manifest)."""
    doc = None if zarr_metadata else _without_zarr_metadata(data, path)
    if doc is not None:
        return doc
    doc = _loads(data, path)
    if not _root_seal_matches(data, doc):
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
    return manifest_of_root(read_root(storage, step, zarr_metadata=False), step, storage.url)


def read_manifest_bytes(storage: Storage, step: int) -> tuple[Manifest, bytes]:
    """The manifest of committed ``step`` and its commit point's bytes as stored (one read)."""
    path = f"{step_dir(step)}/{META}"
    data = storage.read(path)  # FileNotFoundError: not committed (yet)
    return manifest_of_root(parse_root(data, path, zarr_metadata=False), step, storage.url), data


def manifest_of_root(doc: dict, step: int, url: str) -> Manifest:
    attrs = doc.get("attributes")
    if not isinstance(attrs, dict) or MANIFEST_KEY not in attrs:
        raise FormatError(f"step {step} in {url} has no {MANIFEST_KEY!r} manifest")
    try:
        manifest = Manifest.from_dict(attrs[MANIFEST_KEY])
    except ManifestError as e:
        raise FormatError(f"step {step} in {url}: {e}") from None
    if manifest.step != step:
        raise FormatError(f"step directory {step} holds the manifest of step {manifest.step}")
    return manifest


def values_by_writer(storage: Storage, manifest: Manifest) -> dict[str, dict[str, Any]]:
    """Per writer, the values that differ from ``manifest.values``: from the commit point
    (formats 1, 2) or from every writer's fragment (format 3; one read per writer, for tools
    that show or carry them all: inspect, export, reshard)."""
    if not manifest.varying_values:
        return manifest.values_by_writer
    out: dict[str, dict[str, Any]] = {}
    for w in manifest.writers:
        try:
            frag = read_fragment(storage, manifest.step, w, records=False)
        except FileNotFoundError:
            continue
        diff = {k: frag.values[k] for k in manifest.varying_values
                if k in frag.values and frag.values[k] != manifest.values.get(k)}
        if diff:
            out[w] = diff
    return out
