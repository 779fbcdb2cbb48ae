"""The checkpoint manifest and fragment records: the serialized contract of the format.

This module imports nothing else of the package. Its ``to_dict`` forms are what lands in
storage (inside the root group's ``zarr.json`` attributes and in ``.fragments/<writer>.json``);
``from_dict`` validates everything it reads, because it reads untrusted bytes.

Version policy: ``FORMAT_VERSION`` increases on any change a reader of the previous version
could misread. A reader accepts every version up to its own and refuses newer ones with a
message that says to upgrade.

Versions: 1, chunk keys ``c/i/j`` (zarr's default encoding with ``/``); 2, chunk keys
``c.i.j`` (the same encoding with ``.``: an array's chunks are files of its directory, no
directory per index level), recorded per array as ``chunk_separator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

FORMAT_NAME = "ckpt"
FORMAT_VERSION = 2
# Key of the manifest inside the root group's attributes.
MANIFEST_KEY = "ckpt"

JSON = Any


class ManifestError(ValueError):
    """Raised by ``from_dict`` on malformed input; wrapped into ``FormatError`` by callers."""


def _req(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = d[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ManifestError(f"{where}.{key}: expected {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _int_tuple(value: Any, where: str, *, minimum: int = 0) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ManifestError(f"{where}: expected a list of integers")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ManifestError(f"{where}: expected integers >= {minimum}, got {v!r}")
        out.append(v)
    return tuple(out)


def _float(value: Any, where: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float: JSON allows it
        raise ManifestError(f"{where}: number out of range") from None


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
        raise ManifestError(
            f"{where}: written with format version {version}, this library reads up to "
            f"{FORMAT_VERSION}; upgrade the ckpt package to read it"
        )
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

    def __post_init__(self) -> None:
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
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunk_shape))

    @property
    def num_chunks(self) -> int:
        return math.prod(self.grid_shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, JSON]:
        return {
            "path": self.path,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "chunk_shape": list(self.chunk_shape),
            "layout": self.layout,
            **({"chunk_separator": self.chunk_separator} if self.chunk_separator != "/" else {}),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "array") -> ArraySpec:
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

    def to_list(self) -> list[JSON]:
        return [list(self.index), self.nbytes, self.crc32c]

    @classmethod
    def from_list(cls, v: Any, where: str) -> ChunkRecord:
        if not isinstance(v, list) or len(v) != 3:
            raise ManifestError(f"{where}: expected [index, nbytes, crc32c]")
        index = _int_tuple(v[0], f"{where}.index")
        nbytes, crc = v[1], v[2]
        for name, x in (("nbytes", nbytes), ("crc32c", crc)):
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise ManifestError(f"{where}.{name}: expected a non-negative integer")
        if crc >= 1 << 32:
            raise ManifestError(f"{where}.crc32c: out of range")
        return cls(index=index, nbytes=nbytes, crc32c=crc)


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

    def to_dict(self) -> dict[str, JSON]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "step": self.step,
            "save_id": self.save_id,
            "writer": self.writer,
            "created_at": self.created_at,
            "arrays": [a.to_dict() for a in self.arrays.values()],
            "chunks": {p: [c.to_list() for c in cs] for p, cs in self.chunks.items()},
            "values": self.values,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Fragment:
        where = "fragment"
        version = check_version(d, where)
        arrays = {}
        for i, a in enumerate(_req(d, "arrays", list, where)):
            spec = ArraySpec.from_dict(a, f"{where}.arrays[{i}]")
            arrays[spec.path] = spec
        chunks = {}
        for p, cs in _req(d, "chunks", dict, where).items():
            if not isinstance(cs, list):
                raise ManifestError(f"{where}.chunks[{p!r}]: expected a list")
            chunks[p] = tuple(ChunkRecord.from_list(c, f"{where}.chunks[{p!r}]") for c in cs)
        return cls(
            step=_req(d, "step", int, where),
            save_id=_req(d, "save_id", str, where),
            writer=_req(d, "writer", str, where),
            created_at=_float(_req(d, "created_at", (int, float), where), f"{where}.created_at"),
            arrays=arrays,
            chunks=chunks,
            values=_req(d, "values", dict, where),
            format_version=version,
        )


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

    def to_dict(self) -> dict[str, JSON]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "step": self.step,
            "save_id": self.save_id,
            "created_at": self.created_at,
            "library_versions": self.library_versions,
            "writers": list(self.writers),
            "arrays": [a.to_dict() for a in self.arrays.values()],
            "values": self.values,
            "values_by_writer": self.values_by_writer,
            "user_metadata": self.user_metadata,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        where = "manifest"
        version = check_version(d, where)
        arrays = {}
        for i, a in enumerate(_req(d, "arrays", list, where)):
            spec = ArraySpec.from_dict(a, f"{where}.arrays[{i}]")
            arrays[spec.path] = spec
        writers = _req(d, "writers", list, where)
        if not all(isinstance(w, str) for w in writers):
            raise ManifestError(f"{where}.writers: expected a list of strings")
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
        )
