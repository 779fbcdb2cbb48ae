"""The checkpoint manifest and fragment records: the serialized contract of the format.

This module imports nothing else of the package but :mod:`ckpt.jsonfields` and :mod:`ckpt.chunktable`.
Its ``to_dict`` forms are what lands in storage (inside the root group's ``zarr.json`` attributes
and in ``.fragments/<writer>.json``); ``from_dict`` validates everything it reads, because it reads untrusted bytes.

Version policy: ``FORMAT_VERSION`` increases on any change a reader of the previous version
could misread. A reader accepts every version up to its own and refuses newer ones with a
message that says to upgrade.

Versions: 1, chunk keys ``c/i/j`` (zarr's default encoding with ``/``); 2, chunk keys
``c.i.j`` (the same encoding with ``.``: an array's chunks are files of its directory, no
directory per index level), recorded per array as ``chunk_separator``; 3, a step records its
physical ``layout``: ``chunks`` (one file per chunk, as 1 and 2), ``packs`` (every writer's
chunks in a few pack files; each chunk's pack and offset in its writer's fragment; which writer
holds which chunk in ``writer_runs``) or ``shards`` (one zarr shard per array, consolidated);
per-writer values move from the commit point to the writers' fragments (``varying_values``
names them), and the writer list of ranks 0..N-1 is stored as its count: the commit point is
O(arrays) whatever the number of writers. Within version 3, ``containers`` (optional; older
readers ignore it) records the containers the tensors sit in that are not dicts with str keys
(lists, tuples, int keys), so a reader without a template rebuilds the tree as it was saved.
4, a fragment holds its chunk records as columns of integers (``chunk_table``, see
:mod:`ckpt.chunktable`), not one record per chunk keyed by path; the commit point is as in 3.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from . import chunktable
from .jsonfields import (  # noqa: F401 - ManifestError is part of this module's interface
    ManifestError,
    _containers,
    _float,
    _int_tuple,
    _nonnegative_ints,
    _req,
    _str_list,
    runs_from_json,
    writer_name,
    writers_from_json,
    writers_to_json,
)

FORMAT_NAME = "ckpt"
FORMAT_VERSION = 4
LAYOUTS = ("chunks", "packs", "shards")
# Key of the manifest inside the root group's attributes.
MANIFEST_KEY = "ckpt"

JSON = Any


# What check_tensor_path refuses, as one pattern: an empty, "." or ".." part, a backslash or
# NUL, a last part "zarr.json".
_BAD_PATH = re.compile(r"(?:^|/)\.{0,2}(?:/|$)|[\\\x00]|(?:^|/)zarr\.json$")


def check_tensor_path(path: str, where: str) -> str:
    """A tensor path is relative, ``/``-separated, and never leaves the step directory."""
    parts = path.split("/")
    if not path or "\\" in path or "\x00" in path or any(p in ("", ".", "..") for p in parts) or parts[-1] == "zarr.json":
        raise ManifestError(f"{where}: tensor path {path!r} is not a relative path inside the checkpoint")
    return path


def check_version(d: Any, where: str) -> int:
    name = _req(d, "format", str, where)
    if name != FORMAT_NAME:
        raise ManifestError(f"{where}: not a {FORMAT_NAME} checkpoint (format {name!r})")
    version = _req(d, "format_version", int, where)
    if version < 1:
        raise ManifestError(f"{where}: invalid format_version {version}")
    if version > FORMAT_VERSION:
        raise ManifestError(f"{where}: written with format version {version}, this library reads up to "
                            f"{FORMAT_VERSION}; upgrade the ckpt package to read it")
    return version


@dataclass(frozen=True, kw_only=True, slots=True)
class ArraySpec:
    """One logical tensor: global shape, dtype, chunk grid, and the save-time layout."""

    path: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    chunk_shape: tuple[int, ...]
    layout: dict[str, JSON] = field(default_factory=dict)
    # zarr v3 "default" chunk key encoding: "c/0/1" (a directory per index level, the first
    # checkpoints') or "c.0.1" (one file per chunk in the array's directory, since: fewer
    # directories to create and delete per checkpoint)
    chunk_separator: str = "/"
    # Found once per spec, not at every save of a plan that reuses it (thousands per save).
    _grid: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)
    _doc: dict[str, JSON] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_grid", tuple(-(-s // c) for s, c in zip(self.shape, self.chunk_shape)))
        if self.chunk_separator not in ("/", "."):
            raise ManifestError(f"array {self.path!r}: chunk_separator must be '/' or '.', got {self.chunk_separator!r}")
        if len(self.shape) != len(self.chunk_shape):
            raise ManifestError(
                f"array {self.path!r}: shape {self.shape} and chunk_shape {self.chunk_shape} "
                "differ in rank"
            )
        if any(c < 1 for c in self.chunk_shape):
            raise ManifestError(f"array {self.path!r}: chunk sizes must be >= 1")

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return self._grid

    @property
    def num_chunks(self) -> int:
        return math.prod(self.grid_shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, JSON]:
        """The spec as a document (made once; shared: not to be changed by the caller)."""
        if self._doc is None:
            object.__setattr__(self, "_doc", {
                "path": self.path, "shape": list(self.shape), "dtype": self.dtype, "chunk_shape": list(self.chunk_shape),
                "layout": self.layout, **({"chunk_separator": self.chunk_separator} if self.chunk_separator != "/" else {}),
            })
        return self._doc

    @classmethod
    def from_dict(cls, d: Any, where: str = "array") -> ArraySpec:
        if type(d) is dict:  # well-formed: the common case, checked fast (thousands per manifest)
            path, shape, dtype, chunk = d.get("path"), d.get("shape"), d.get("dtype"), d.get("chunk_shape")
            layout, separator = d.get("layout", {}), d.get("chunk_separator", "/")
            if (type(path) is str and type(shape) is list and type(dtype) is str and type(chunk) is list
                    and type(layout) is dict and (separator == "/" or separator == ".") and len(shape) == len(chunk)
                    and _nonnegative_ints(shape) and _nonnegative_ints(chunk) and 0 not in chunk
                    and _BAD_PATH.search(path) is None):
                return cls(path=path, shape=tuple(shape), dtype=dtype, chunk_shape=tuple(chunk), layout=layout,
                           chunk_separator=separator)
        path = check_tensor_path(_req(d, "path", str, where), f"{where}.path")
        layout = d.get("layout", {})
        if not isinstance(layout, dict):
            raise ManifestError(f"{where}.layout: expected an object")
        return cls(
            path=path,
            shape=_int_tuple(_req(d, "shape", list, where), f"{where}.shape"),
            dtype=_req(d, "dtype", str, where),
            chunk_shape=_int_tuple(_req(d, "chunk_shape", list, where), f"{where}.chunk_shape", minimum=1),
            layout=layout,
            chunk_separator=d.get("chunk_separator", "/"),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ChunkRecord:
    """One chunk as its writer stored it: grid index, stored size (data + checksum), crc32c."""

    index: tuple[int, ...]
    nbytes: int
    crc32c: int
    pack: int | None = None  # layout "packs": which of the writer's packs holds it ...
    offset: int | None = None  # ... and at which byte

    def to_list(self) -> list[JSON]:
        if self.pack is None:
            return [list(self.index), self.nbytes, self.crc32c]
        return [list(self.index), self.nbytes, self.crc32c, self.pack, self.offset]

    @classmethod
    def from_list(cls, v: Any, where: str) -> ChunkRecord:
        if type(v) is list and len(v) == 5:  # a pack's record, well-formed: the common case, checked fast
            index, nbytes, crc, pack, offset = v
            if (type(index) is list and type(nbytes) is int and type(crc) is int and type(pack) is int
                    and type(offset) is int and nbytes >= 0 and 0 <= crc < 1 << 32 and pack >= 0 and offset >= 0
                    and _nonnegative_ints(index)):
                return cls(index=tuple(index), nbytes=nbytes, crc32c=crc, pack=pack, offset=offset)
        if not isinstance(v, list) or len(v) not in (3, 5):
            raise ManifestError(f"{where}: expected [index, nbytes, crc32c] or [index, nbytes, crc32c, pack, offset]")
        index = _int_tuple(v[0], f"{where}.index")
        for name, x in zip(("nbytes", "crc32c", "pack", "offset"), v[1:]):
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise ManifestError(f"{where}.{name}: expected a non-negative integer")
        if v[2] >= 1 << 32:
            raise ManifestError(f"{where}.crc32c: out of range")
        pack, offset = (v[3], v[4]) if len(v) == 5 else (None, None)
        return cls(index=index, nbytes=v[1], crc32c=v[2], pack=pack, offset=offset)


# The array declarations of the fragment parsed last, as JSON and as specs (immutable, shared).
_LAST_ARRAYS: tuple[list, dict[str, ArraySpec]] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Fragment:
    """Everything one writer contributed to one checkpoint.

    ``arrays`` declares every array the writer holds a part of (even if another replica wrote
    it), so the committer can check that all writers agree on shapes, dtypes and grids.
    """

    step: int
    save_id: str
    writer: str
    created_at: float
    arrays: dict[str, ArraySpec]
    chunks: dict[str, tuple[ChunkRecord, ...]]
    values: dict[str, JSON] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    packs: tuple[str, ...] = ()  # layout "packs": this writer's pack files, by the records' pack index
    containers: dict[str, JSON] = field(default_factory=dict)  # see Manifest.containers
    # Format 4, as read: the records as columns (what a committer checks); ``chunks`` is empty
    # when read with ``records=False``.
    table: chunktable.ChunkTable | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, JSON]:
        out = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "step": self.step,
            "save_id": self.save_id,
            "writer": self.writer,
            "created_at": self.created_at,
            "arrays": [a.to_dict() for a in self.arrays.values()],
            "values": self.values,
        }
        if self.format_version >= 4:
            specs = list(self.arrays.values())
            out[chunktable.KEY] = chunktable.encode(self.chunks, {a.path: i for i, a in enumerate(specs)},
                                                    [a.grid_shape for a in specs])
        else:
            out["chunks"] = {p: [c.to_list() for c in cs] for p, cs in self.chunks.items()}
        if self.packs:
            out["packs"] = list(self.packs)
        if self.containers:
            out["containers"] = self.containers
        return out

    @classmethod
    def from_dict(cls, d: Any, *, records: bool = True) -> Fragment:
        """``records=False``: a fragment of format 4 keeps its records as columns only
        (``table``), for a committer; ``chunks`` is then empty."""
        where = "fragment"
        version = check_version(d, where)
        raw = _req(d, "arrays", list, where)
        global _LAST_ARRAYS
        last = _LAST_ARRAYS
        if last is not None and last[0] == raw:
            # The same declarations as the fragment read before (every writer of an FSDP job
            # declares the same arrays): compared as JSON, not parsed again.
            arrays = dict(last[1])
        else:
            arrays = {}
            for i, a in enumerate(raw):
                spec = ArraySpec.from_dict(a, f"{where}.arrays[{i}]")
                arrays[spec.path] = spec
            _LAST_ARRAYS = (raw, dict(arrays))
        packs = pack_names(d, where)
        table = None
        if version >= 4:
            specs = list(arrays.values())
            if len(specs) != len(raw):
                raise ManifestError(f"{where}.arrays: an array declared twice")
            table = chunktable.decode(_req(d, chunktable.KEY, dict, where), len(specs), len(packs))
            chunks = table_records(table, specs) if records else {}
        else:
            chunks = {}
            for p, cs in _req(d, "chunks", dict, where).items():
                if not isinstance(cs, list):
                    raise ManifestError(f"{where}.chunks[{p!r}]: expected a list")
                chunks[p] = tuple(ChunkRecord.from_list(c, f"{where}.chunks[{p!r}]") for c in cs)
            for p, cs in chunks.items():
                if any(c.pack is not None and c.pack >= len(packs) for c in cs):
                    raise ManifestError(f"{where}.chunks[{p!r}]: a pack index beyond the fragment's packs")
        return cls(
            step=_req(d, "step", int, where),
            save_id=_req(d, "save_id", str, where),
            writer=_req(d, "writer", str, where),
            created_at=_float(_req(d, "created_at", (int, float), where), f"{where}.created_at"),
            arrays=arrays,
            chunks=chunks,
            values=_req(d, "values", dict, where),
            format_version=version,
            packs=tuple(packs),
            containers=_containers(d.get("containers", {}), f"{where}.containers"),
            table=table,
        )


def pack_names(d: dict, where: str) -> list[str]:
    packs = d.get("packs", [])
    if not isinstance(packs, list) or not all(isinstance(p, str) and p and "/" not in p and p not in (".", "..")
                                               for p in packs):
        raise ManifestError(f"{where}.packs: expected a list of file names")
    return packs


def table_records(table: chunktable.ChunkTable, specs: list[ArraySpec]) -> dict[str, tuple[ChunkRecord, ...]]:
    """A format-4 table as the records of format 3 (by path, in written order)."""
    out: dict[str, list[ChunkRecord]] = {}
    paths = [a.path for a in specs]
    for at, index, nbytes, crc, pack, offset in table.records([a.grid_shape for a in specs]):
        out.setdefault(paths[at], []).append(ChunkRecord(index=index, nbytes=nbytes, crc32c=crc, pack=pack,
                                                         offset=offset))
    return {p: tuple(rs) for p, rs in out.items()}


@dataclass(frozen=True, kw_only=True, slots=True)
class Manifest:
    """The committed checkpoint: written once, last, inside the root group's ``zarr.json``.

    ``values`` holds non-tensor state common to all writers (as written by the first writer);
    ``values_by_writer`` only the entries where another writer's value differs (per-rank data
    loader positions, RNG states).
    """

    step: int
    save_id: str
    created_at: float
    writers: tuple[str, ...]
    arrays: dict[str, ArraySpec]
    values: dict[str, JSON] = field(default_factory=dict)
    values_by_writer: dict[str, dict[str, JSON]] = field(default_factory=dict)
    library_versions: dict[str, str] = field(default_factory=dict)
    user_metadata: dict[str, JSON] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    layout: str = "chunks"
    # Layout "packs": per array, which writer holds which chunk, as runs [first chunk (linear
    # index), count, first writer (index into ``writers``), writer stride, chunks per writer]:
    # chunk first+k is held by writer w0 + stride * (k // per). One run per array for the
    # common layouts (FSDP's Shard(0), a tensor written whole by one replica).
    writer_runs: dict[str, tuple[tuple[int, int, int, int, int], ...]] = field(default_factory=dict)
    varying_values: tuple[str, ...] = ()  # values whose per-writer copy is in the writer's fragment
    # Containers of tensors that are not dicts with str keys, by path ("" the root): "list",
    # "tuple", "int" (all keys ints) or the int keys of a mixed dict (ckpt.state.container_kinds).
    containers: dict[str, JSON] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ManifestError(f"manifest: unknown layout {self.layout!r}; upgrade the ckpt package to read it")

    def to_dict(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "step": self.step,
            "save_id": self.save_id,
            "created_at": self.created_at,
            "library_versions": self.library_versions,
            "writers": writers_to_json(self.writers) if self.format_version >= 3 else list(self.writers),
            "arrays": [a.to_dict() for a in self.arrays.values()],
            "values": self.values,
            "values_by_writer": self.values_by_writer,
            "user_metadata": self.user_metadata,
        }
        if self.format_version >= 3:
            out["layout"] = self.layout
            if self.writer_runs:
                out["writer_runs"] = {p: [list(r) for r in runs] for p, runs in self.writer_runs.items()}
            if self.varying_values:
                out["varying_values"] = list(self.varying_values)
            if self.containers:
                out["containers"] = self.containers
        return out

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        where = "manifest"
        version = check_version(d, where)
        arrays = {}
        for i, a in enumerate(_req(d, "arrays", list, where)):
            spec = ArraySpec.from_dict(a, f"{where}.arrays[{i}]")
            arrays[spec.path] = spec
        writers = writers_from_json(_req(d, "writers", (list, dict), where), f"{where}.writers")
        by_writer = d.get("values_by_writer", {})
        if not isinstance(by_writer, dict) or not all(isinstance(v, dict) for v in by_writer.values()):
            raise ManifestError(f"{where}.values_by_writer: expected an object of objects")
        versions = d.get("library_versions", {})
        user = d.get("user_metadata", {})
        if not isinstance(versions, dict) or not isinstance(user, dict):
            raise ManifestError(f"{where}: library_versions and user_metadata must be objects")
        return cls(
            step=_req(d, "step", int, where),
            save_id=_req(d, "save_id", str, where),
            created_at=_float(_req(d, "created_at", (int, float), where), f"{where}.created_at"),
            writers=tuple(writers),
            arrays=arrays,
            values=_req(d, "values", dict, where),
            values_by_writer=by_writer,
            library_versions=versions,
            user_metadata=user,
            format_version=version,
            layout=_req(d, "layout", str, where) if version >= 3 else "chunks",
            writer_runs=runs_from_json(d.get("writer_runs", {}), f"{where}.writer_runs", len(writers)),
            varying_values=tuple(_str_list(d.get("varying_values", []), f"{where}.varying_values")),
            containers=_containers(d.get("containers", {}), f"{where}.containers"),
        )
