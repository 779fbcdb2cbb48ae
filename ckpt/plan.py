"""Planning, pure: from a state dict and its layout to what to write, and from a manifest and
a target layout to what to read. No I/O, no collectives, nothing changed in the state (a load
plan says which padding regions to zero; the executor zeroes them).

Save:  :func:`plan_save` -> :class:`SavePlan` (the arrays, this process's chunks, its values)
Load:  :func:`plan_load` -> :class:`LoadPlan` (which chunks overlap each destination shard)
Array-level geometry (chunk grids, requests) is in ``ckpt.planning``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .dtypes import info_of, name_of
from .errors import StateMismatchError
from .format import CHUNK_SEPARATOR
from .layout import Sharded, TensorLayout, layout_of
from .layouts import ChunkLayout
from .manifest import ArraySpec, Manifest
from .planning import ReadRequest, ReadTarget, WriteRequest, chunk_shape_for, plan_array_reads, plan_array_writes
from .state import container_kinds, encode_value, flatten

DEFAULT_MAX_CHUNK_BYTES = 16 << 20
# A writer's chunks go into packs of about this size (more than one only for a large part, so
# that several I/O threads write at once): files per step stay 2 x writers + 1.
DEFAULT_PACK_BYTES = 1 << 30
PACK_ALIGN = 4096  # large chunks start on a page in their pack (direct I/O from host memory)
PACK_ALIGN_MIN = 256 << 10


def request_nbytes(req: WriteRequest | ReadRequest, itemsize: int) -> int:
    n = itemsize
    for s in req.chunk_shape:
        n *= s
    return n


@dataclass(frozen=True, slots=True)
class SavePlan:
    """What one process writes: its view of every array, its chunks, its non-tensor values."""

    arrays: dict[str, ArraySpec]
    requests: list[WriteRequest]
    metadata: list[ArraySpec]  # arrays whose zarr.json this process writes (it owns chunk 0)
    values: dict[str, Any] = field(default_factory=dict)
    containers: dict[str, Any] = field(default_factory=dict)  # ckpt.state.container_kinds of the state

    @property
    def nbytes(self) -> int:
        return sum(request_nbytes(r, r.tensor.element_size()) for r in self.requests)


@dataclass(frozen=True, slots=True)
class TensorItem:
    """A tensor leaf of a state dict: its path, the local tensor, and where that sits globally."""

    path: str
    tensor: torch.Tensor
    layout: TensorLayout


def split_state(
    state_dict: Any, *, rank: int = 0, world: int = 1, allow_pickle: bool = False
) -> tuple[list[TensorItem], dict[str, Any]]:
    """Tensor leaves with their layouts, and the non-tensor leaves encoded as JSON (a copy)."""
    items: list[TensorItem] = []
    values: dict[str, Any] = {}
    for path, leaf, is_tensor in flatten(state_dict):
        if is_tensor:
            local, layout = layout_of(leaf, rank=rank, world=world)
            items.append(TensorItem(path, local, layout))
        else:
            values[path] = encode_value(leaf, allow_pickle=allow_pickle, where=path)
    return items, values


def plan_items(
    items: Sequence[TensorItem], values: dict[str, Any], *, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> SavePlan:
    """Pure: the arrays, and the chunks this process writes of them."""
    if max_chunk_bytes < 1:
        raise ValueError("max_chunk_bytes must be >= 1")
    arrays: dict[str, ArraySpec] = {}
    requests: list[WriteRequest] = []
    metadata: list[ArraySpec] = []
    for item in items:
        info = info_of(item.tensor.dtype)
        layout = item.layout
        chunk = chunk_shape_for(layout.global_shape, layout.edges_gcd, info.itemsize, max_chunk_bytes)
        spec = ArraySpec(
            path=item.path, shape=layout.global_shape, dtype=info.name, chunk_shape=chunk, layout=layout.description,
            chunk_separator=CHUNK_SEPARATOR,
        )
        arrays[item.path] = spec
        pieces = layout.pieces
        if chunk == spec.shape and len(pieces) == 1 and pieces[0].box.sizes == chunk and not any(pieces[0].local_offsets) \
                and chunk and all(chunk):
            # Held whole, stored as one chunk: the common case, planned without walking the grid.
            if layout.writes(item.path, pieces[0]):
                requests.append(WriteRequest(item.path, (0,) * len(chunk), item.tensor,
                                             tuple(slice(0, n) for n in chunk), chunk, CHUNK_SEPARATOR))
                metadata.append(spec)
            continue
        mine = plan_array_writes(item.path, spec, item.tensor, layout)
        requests.extend(mine)
        if any(not any(r.index) for r in mine):
            metadata.append(spec)
    return SavePlan(arrays, requests, metadata, values)


def plan_save(
    state_dict: Any,
    *,
    rank: int = 0,
    world: int = 1,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    allow_pickle: bool = False,
) -> SavePlan:
    """Pure: from a state dict and its layout to write requests. No I/O, no collectives."""
    items, values = split_state(state_dict, rank=rank, world=world, allow_pickle=allow_pickle)
    plan = plan_items(items, values, max_chunk_bytes=max_chunk_bytes)
    return replace(plan, containers=container_kinds(state_dict))


# ---------------------------------------------------------------------------------------------
# Load


@dataclass(frozen=True, slots=True)
class ZeroRegion:
    """Rows of a padded dimension past the logical size: no data is stored for them, the
    executor makes them zeros."""

    tensor: torch.Tensor
    dim: int
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class LoadPlan:
    step: int
    requests: list[ReadRequest]
    values: dict[str, Any]  # path -> encoded JSON value to set
    arrays: dict[str, ArraySpec]
    zero: list[ZeroRegion] = field(default_factory=list)
    layout: ChunkLayout = field(default_factory=ChunkLayout)

    @property
    def nbytes(self) -> int:
        return sum(request_nbytes(r, getattr(torch, self.arrays[r.path].dtype).itemsize) for r in self.requests)


def plan_load(
    state_dict: Any,
    manifest: Manifest,
    *,
    rank: int = 0,
    world: int = 1,
    writer: str | None = None,
    strict: bool = True,
    allow_cast: bool = False,
    writer_values: dict[str, Any] | None = None,
) -> LoadPlan:
    """Pure: which chunks to read into which destination regions; every mismatch at once."""
    problems: list[str] = []
    requests: list[ReadRequest] = []
    values: dict[str, Any] = {}
    zero: list[ZeroRegion] = []
    seen: set[str] = set()
    # This writer's own values: format 3 keeps them in its fragment (the caller read it),
    # formats 1 and 2 in the commit point.
    if writer_values is None:
        writer_values = manifest.values_by_writer.get(writer or "", {})
    for path, leaf, is_tensor in flatten(state_dict):
        seen.add(path)
        if not is_tensor:
            if path in writer_values:
                values[path] = writer_values[path]
            elif path in manifest.values:
                values[path] = manifest.values[path]
            elif path in manifest.arrays:
                problems.append(f"{path!r}: a tensor in the checkpoint, {type(leaf).__name__} in the state")
            elif strict:
                problems.append(f"{path!r}: missing from the checkpoint")
            continue
        spec = manifest.arrays.get(path)
        if spec is None:
            if path in manifest.values:
                problems.append(f"{path!r}: a non-tensor value in the checkpoint, a tensor in the state")
            elif strict:
                problems.append(f"{path!r}: missing from the checkpoint")
            continue
        if type(leaf) is torch.Tensor:  # held whole, stored as one chunk: the common case, planned fast
            shape = spec.shape
            if (shape and spec.chunk_shape == shape and leaf.shape == shape and all(shape)
                    and name_of(leaf.dtype) == spec.dtype):
                whole = tuple(slice(0, n) for n in shape)
                requests.append(ReadRequest(path, (0,) * len(shape), shape, (ReadTarget(leaf, whole, whole),),
                                            spec.chunk_separator))
                continue
        local, layout = layout_of(leaf, rank=rank, world=1)
        dtype = name_of(local.dtype)
        if layout.global_shape != spec.shape:
            problems.append(f"{path!r}: shape {list(spec.shape)} in the checkpoint, {list(layout.global_shape)} in the state")
            continue
        if dtype != spec.dtype and not allow_cast:
            problems.append(f"{path!r}: dtype {spec.dtype} in the checkpoint, {dtype} in the state (allow_cast=True converts)")
            continue
        requests.extend(plan_array_reads(path, spec, local, layout.pieces))
        if isinstance(leaf, Sharded) and leaf.logical_size is not None:
            pad = _padding(leaf)
            if pad is not None:
                zero.append(pad)
    if strict:
        for path in manifest.arrays.keys() - seen:
            problems.append(f"{path!r}: in the checkpoint, not in the state (strict=False ignores it)")
        for path in manifest.values.keys() - seen:
            problems.append(f"{path!r}: in the checkpoint, not in the state (strict=False ignores it)")
    if problems:
        problems.sort()
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise StateMismatchError(
            f"state does not match checkpoint step {manifest.step}: {len(problems)} problem(s): "
            + "; ".join(problems[:20]) + more,
            problems,
        )
    return LoadPlan(manifest.step, requests, values, manifest.arrays, zero, ChunkLayout.of(manifest))


def _padding(leaf: Sharded) -> ZeroRegion | None:
    """The rows of ``leaf`` past the logical size of its padded dimension, if any."""
    d = leaf.dim % leaf.tensor.dim()  # type: ignore[operator]
    local = leaf.tensor.shape[d]
    start = leaf.rank * local
    valid = max(0, min(leaf.logical_size or 0, start + local) - start)
    return ZeroRegion(leaf.tensor, d, valid, local - valid) if valid < local else None


# ---------------------------------------------------------------------------------------------
# Packs


@dataclass(frozen=True, slots=True)
class PackSlot:
    """Where one write request's chunk goes: pack number ``pack`` of its writer, at ``offset``."""

    pack: int
    offset: int


def pack_slots(requests: Sequence[WriteRequest], *, threads: int = 1,
               pack_bytes: int = DEFAULT_PACK_BYTES) -> tuple[list[PackSlot], list[int]]:
    """Pure: a slot for every request, in order, and the size of every pack. A chunk takes its
    stored bytes plus the checksum; a large chunk starts on a page boundary. A writer's part is
    split into at most ``threads`` packs of at least ``pack_bytes`` / ``threads``... and no more
    packs than its size needs at ``pack_bytes`` each."""
    sizes = [request_nbytes(r, r.tensor.element_size()) + 4 for r in requests]
    total = sum(sizes)
    packs = max(1, min(threads, -(-total // pack_bytes))) if total else 1
    target = -(-total // packs) if total else 0
    slots, ends = [], [0]
    for n in sizes:
        off = ends[-1]
        if off >= target and len(ends) < packs and off > 0:
            ends.append(0)
            off = 0
        if n - 4 >= PACK_ALIGN_MIN and off % PACK_ALIGN:
            off += PACK_ALIGN - off % PACK_ALIGN
        slots.append(PackSlot(len(ends) - 1, off))
        ends[-1] = off + n
    return slots, ends
