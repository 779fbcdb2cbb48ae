"""``ckpt import dcp``: a DCP checkpoint folder (``.metadata`` + ``__R_N.distcp``) becomes a
committed step of a run, bit for bit.

Nothing of the source is unpickled outside an allow-list: the ``.metadata`` file through
``ckpt.dcp.metadata.load_metadata`` (DCP's dataclasses, ``torch.Size``, dtypes, paths; any
other global refused), every tensor item (a ``torch.save`` blob) with
``torch.load(weights_only=True)``, every value as in ``ckpt.dcp.Writer`` (JSON where the
weights-only reader decodes it, else kept opaque). Before a byte is written, the metadata is
checked against the files (every item present and inside its file); then the items are
streamed into the step through ``ckpt.ingest.write_step`` (one item in memory at a time), with
chunk grids dividing every slice boundary of the source, and committed. A failure leaves
nothing behind.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from ..dtypes import info_by_name, info_of
from ..errors import CheckpointNotFoundError, FormatError
from ..format import CHUNK_SEPARATOR
from ..ingest import DEFAULT_BUFFER_BYTES, SourcePiece, write_step
from ..layout import Box
from ..manifest import ArraySpec, Manifest
from ..plan import DEFAULT_MAX_CHUNK_BYTES
from ..planning import choose_chunk_shape
from ..state import encode_value
from ..storage import RetryPolicy, Storage, open_storage
from .metadata import METADATA_FILE, load_metadata
from .tree import ObjPath, assemble, ckpt_path, decode_leaf, list_containers, value_groups

_ZIP_MAGIC = b"PK\x03\x04"


def read_source(source: Storage) -> Metadata:
    """The DCP metadata of the folder ``source``; a clear error if it is not a DCP checkpoint."""
    try:
        data = source.read(METADATA_FILE)
    except FileNotFoundError:
        names = [n for n in source.list_dir("") if n.endswith(".metadata")]
        hint = (f" (it has {names[0]}: per-rank metadata of dcp.save(use_collectives=False), not supported)"
                if names else "")
        raise CheckpointNotFoundError(f"{source.url} is not a DCP checkpoint: it has no {METADATA_FILE}{hint}; "
                                      "a DCP checkpoint folder holds .metadata and __R_N.distcp files") from None
    md = load_metadata(data, f"{source.url}/{METADATA_FILE}")
    if not isinstance(md.storage_data, dict):
        raise FormatError(f"{source.url}/{METADATA_FILE} records no file locations (storage data of type "
                          f"{type(md.storage_data).__name__}): it was not written by DCP's FileSystemWriter")
    return md


def _location(md: Metadata, index: Any, sizes: dict[str, int | None], source: Storage) -> tuple[str, int, int]:
    info = (md.storage_data or {}).get(index)
    if info is None:
        raise FormatError(f"{source.url}: the metadata records no file for {index.fqn!r}")
    path, offset, length = getattr(info, "relative_path", None), getattr(info, "offset", None), getattr(
        info, "length", None)
    if not isinstance(path, str) or not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
        raise FormatError(f"{source.url}: the metadata's storage record of {index.fqn!r} is malformed")
    if getattr(info, "transform_descriptors", None):
        raise FormatError(f"{source.url}: {index.fqn!r} was written through DCP stream extensions "
                          f"{list(info.transform_descriptors)} (compression?), which ckpt does not read")
    if path not in sizes:
        sizes[path] = source.size(path)
    size = sizes[path]
    if size is None:
        raise FormatError(f"{source.url}: {path}, which holds {index.fqn!r}, is missing")
    if offset + length > size:
        raise FormatError(f"{source.url}: {path} is truncated: {size} bytes, {index.fqn!r} ends at byte "
                          f"{offset + length}")
    return path, offset, length


def _read(source: Storage, path: str, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    source.read_range_into(path, offset, [memoryview(buf)])
    return bytes(buf)


def _item_reader(source: Storage, loc: tuple[str, int, int], fqn: str, box: Box,
                 dtype: torch.dtype) -> Callable[[Box], torch.Tensor]:
    def read(_box: Box) -> torch.Tensor:
        raw = _read(source, *loc)
        if not raw.startswith(_ZIP_MAGIC):
            raise FormatError(f"{source.url}: {loc[0]} at byte {loc[1]} ({fqn!r}) is not torch.save data; DCP's "
                              "serialization_format=SAFETENSORS is not supported")
        try:
            t = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - the item is damaged, or asks for more than tensors
            raise FormatError(f"{source.url}: {fqn!r} in {loc[0]} does not load as a tensor ({e})") from None
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != box.sizes or t.dtype != dtype:
            raise FormatError(f"{source.url}: {fqn!r} in {loc[0]} is not the {dtype} slice {list(box.sizes)} its "
                              "metadata records")
        return t

    return read


def import_dcp(
    src: str | os.PathLike[str] | Storage,
    run: str | os.PathLike[str] | Storage,
    step: int,
    *,
    layout: str = "shards",
    overwrite: bool = False,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    threads: int = 8,
    storage_options: dict[str, Any] | None = None,
    retry: RetryPolicy | None = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Manifest:
    """Import the DCP checkpoint folder ``src`` as committed step ``step`` of ``run``."""
    source = open_storage(src, storage_options=storage_options, retry=retry)
    dest = open_storage(run, storage_options=storage_options, retry=retry)
    md = read_source(source)
    mapping = md.planner_data if isinstance(md.planner_data, dict) else {}

    def path_of(fqn: str) -> ObjPath:
        p = mapping.get(fqn, (fqn,))
        if not isinstance(p, tuple) or not all(isinstance(c, (str, int)) for c in p):
            raise FormatError(f"{source.url}: the metadata maps {fqn!r} to {p!r}, not an object path")
        return p

    sizes: dict[str, int | None] = {}
    arrays: dict[str, ArraySpec] = {}
    pieces: list[SourcePiece] = []
    tensor_paths: list[ObjPath] = []
    leaves: dict[ObjPath, Any] = {}
    for fqn, entry in md.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            leaves[path_of(fqn)] = decode_leaf(_read(source, *_location(md, MetadataIndex(fqn), sizes, source)))
            continue
        if not isinstance(entry, TensorStorageMetadata):
            raise FormatError(f"{source.url}: {fqn!r} has metadata of type {type(entry).__name__}")
        op = path_of(fqn)
        tensor_paths.append(op)
        path = ckpt_path(op)
        info = info_of(entry.properties.dtype)
        shape = tuple(entry.size)
        boxes = [Box(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks]
        for b in boxes:
            if len(b.offsets) != len(shape) or any(o < 0 or o + s > n for o, s, n in zip(b.offsets, b.sizes, shape)):
                raise FormatError(f"{source.url}: a slice of {fqn!r} lies outside its shape {list(shape)}")
        chunk = choose_chunk_shape(shape, boxes, info.itemsize, max_chunk_bytes)
        arrays[path] = ArraySpec(path=path, shape=shape, dtype=info.name, chunk_shape=chunk,
                                 layout={"kind": "imported", "from": "dcp", "slices": len(boxes)},
                                 chunk_separator=CHUNK_SEPARATOR)
        for b in boxes:
            if any(s == 0 for s in b.sizes):
                continue
            loc = _location(md, MetadataIndex(fqn, b.offsets), sizes, source)
            pieces.append(SourcePiece(path, b, _item_reader(source, loc, fqn, b, info.torch_dtype), blockwise=False))
    values = {ckpt_path(root): encode_value(assemble(root, {m: leaves[m] for m in members}), allow_pickle=False,
                                            where=ckpt_path(root))
              for root, members in value_groups(sorted(leaves, key=str), tensor_paths).items()}
    if on_start is not None:
        on_start(sum(a.numel * info_by_name(a.dtype).itemsize for a in arrays.values()))
    user = {"ckpt.import": {"format": "dcp", "source": source.url, "dcp_version": md.version}}
    return write_step(dest, step, arrays, pieces, values=values, containers=list_containers(tensor_paths),
                      user_metadata=user, layout=layout, overwrite=overwrite, buffer_bytes=buffer_bytes,
                      threads=threads, progress=progress)
