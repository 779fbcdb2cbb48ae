"""A save plan as it crosses the wire: JSON, with tensors named by byte offsets in a segment.

The trainer's plan holds views of a slab (one shared-memory segment). ``encode_plan`` writes
each distinct view as ``[offset, dtype, shape]`` and each chunk request against it
(``encode_chunk_index``: the same cut down to what a restore reads, with each chunk's crc32c);
``decode_plan`` rebuilds a :class:`ckpt.SavePlan` whose tensors are views of the agent's own
mapping of the segment, checking everything (the JSON comes from another process: every
offset, dtype, shape and slice is validated against the segment; nothing is unpickled).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ckpt.manifest import ArraySpec, ManifestError
from ckpt.plan import SavePlan
from ckpt.planning import WriteRequest

from .errors import PlanError

PLAN_VERSION = 1
INDEX_VERSION = 1
_MAX_DIMS = 32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: Any) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(dt, torch.dtype):
        raise PlanError(f"unknown dtype {name!r}")
    return dt


def _plan_doc(plan: SavePlan, base: torch.Tensor) -> dict[str, Any]:
    start, end = base.data_ptr(), base.data_ptr() + base.numel()
    tensors: list[list[Any]] = []
    index: dict[tuple, int] = {}
    requests = []
    for r in plan.requests:
        t = r.tensor
        if t.device.type != "cpu" or not t.is_contiguous():
            raise PlanError(f"{r.path}: chunk source is not a contiguous host view of the segment")
        ptr, n = t.data_ptr(), t.numel() * t.element_size()
        if not (start <= ptr and ptr + n <= end):
            raise PlanError(f"{r.path}: chunk source lies outside the segment")
        key = (ptr, t.dtype, tuple(t.shape))
        if key not in index:
            index[key] = len(tensors)
            tensors.append([ptr - start, dtype_name(t.dtype), list(t.shape)])
        requests.append([r.path, list(r.index), index[key], [[s.start, s.stop] for s in r.slices],
                         list(r.chunk_shape)])
    return {
        "version": PLAN_VERSION,
        "arrays": [a.to_dict() for a in plan.arrays.values()],
        "metadata": [a.path for a in plan.metadata],
        "values": plan.values,
        "containers": plan.containers,
        "tensors": tensors,
        "requests": requests,
    }


def encode_plan(plan: SavePlan, base: torch.Tensor) -> str:
    """JSON of ``plan``; every request's tensor must be a contiguous view inside ``base``."""
    return json.dumps(_plan_doc(plan, base), separators=(",", ":"), allow_nan=False)


def encode_chunk_index(plan: SavePlan, base: torch.Tensor,
                       crcs: Mapping[tuple[str, tuple[int, ...]], int] | None = None) -> str:
    """What a restore reads of a snapshot, and no more (see :class:`ChunkIndex`): the chunks of
    ``plan`` that lie whole and contiguous in ``base`` as ``[key, offset, nbytes, crc32c]``, the
    others as a plan of only them and the arrays they belong to (no values, no array without a
    chunk here: the plan declares every array of the save, O(arrays), where a writer's chunks are
    O(arrays / writers)). A crc32c ``crcs`` does not have is null."""
    crcs = crcs or {}
    start = base.data_ptr()
    spans, others = [], []
    for r in plan.requests:
        region = r.tensor.detach()[r.slices]
        if not r.ragged and region.is_contiguous() and region.device.type == "cpu":
            spans.append([r.key, region.data_ptr() - start, region.numel() * region.element_size(),
                          crcs.get((r.path, tuple(r.index)))])
        else:
            others.append(r)
    used = {r.path for r in others}
    rest = _plan_doc(SavePlan({p: a for p, a in plan.arrays.items() if p in used}, others, [], {}), base)
    doc = {"version": INDEX_VERSION, "spans": spans, "plan": rest,
           "crc32c": [crcs.get((r.path, tuple(r.index))) for r in others]}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True, slots=True)
class DecodedPlan:
    plan: SavePlan
    end: int  # bytes of the segment the plan uses

    def chunk_requests(self, step_prefix: str) -> dict[str, WriteRequest]:
        """Storage key of every chunk of the plan (``<step>/<array>/c/...``) -> its request."""
        return {f"{step_prefix}/{r.key}": r for r in self.plan.requests}


def _ints(v: Any, what: str, *, minimum: int = 0, max_len: int = _MAX_DIMS) -> list[int]:
    if not isinstance(v, list) or len(v) > max_len or any(
            isinstance(x, bool) or not isinstance(x, int) or x < minimum for x in v):
        raise PlanError(f"{what}: expected a list of integers >= {minimum}")
    return v


def _load(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise PlanError(f"plan is not valid JSON: {e}") from None


def decode_plan(text: str | bytes, buffer: torch.Tensor) -> DecodedPlan:
    """Rebuild the plan against ``buffer`` (the uint8 mapping of the segment); raises PlanError."""
    return _decode(_load(text), buffer)


@dataclass(frozen=True, slots=True)
class ChunkIndex:
    """A snapshot's chunks as a restore reads them: ``spans`` (storage key within the step,
    offset and bytes in the segment, crc32c or None) for those stored whole and contiguously,
    which a reader copies with one ``pread``; ``plan`` and ``crcs`` (per request) for the others
    (a ragged edge chunk, a chunk strided in its tensor)."""

    spans: list[list]  # [key, offset, nbytes, crc32c or None] (tuples where encoded, lists where decoded)
    plan: DecodedPlan
    crcs: list[int | None]

    def keys(self, step_prefix: str) -> list[str]:
        return [f"{step_prefix}/{k}" for k, *_ in self.spans] + list(self.plan.chunk_requests(step_prefix))


def _crc(c: Any) -> bool:
    return c is None or (not isinstance(c, bool) and isinstance(c, int) and 0 <= c < 1 << 32)


def _spans_valid(spans: list, size: int) -> bool:
    """Whether every span is ``[key, offset, nbytes, crc32c or None]`` inside a ``size``-byte
    segment: the checks of thousands of spans column by column, in C loops (bools, subclasses
    of int, are refused by the exact type sets)."""
    if not spans:
        return True
    if {type(sp) for sp in spans} != {list} or set(map(len, spans)) != {4}:
        return False
    keys, offsets, sizes, crcs = zip(*spans)
    if set(map(type, keys)) != {str} or set(map(type, offsets)) != {int} or set(map(type, sizes)) != {int}:
        return False
    if not set(map(type, crcs)) <= {int, type(None)}:
        return False
    ints = [c for c in crcs if c is not None]
    if ints and (min(ints) < 0 or max(ints) >= 1 << 32):
        return False
    return min(offsets) >= 0 and min(sizes) > 0 and max(map(int.__add__, offsets, sizes)) <= size


def decode_chunk_index(text: str | bytes, buffer: torch.Tensor) -> ChunkIndex:
    """A chunk index (:func:`encode_chunk_index`) against ``buffer``: every span checked to lie in
    it, the plan of the other chunks checked as :func:`decode_plan` checks one."""
    doc = _load(text)
    if not isinstance(doc, dict) or doc.get("version") != INDEX_VERSION or not isinstance(doc.get("spans"), list):
        raise PlanError(f"chunk index: expected an object of version {INDEX_VERSION} with spans")
    size = buffer.numel()
    spans = doc["spans"]
    if not _spans_valid(spans, size):  # then find the first bad one, for the message
        for i, sp in enumerate(spans):
            if not (isinstance(sp, list) and len(sp) == 4 and isinstance(sp[0], str) and _crc(sp[3])
                    and all(type(x) is int for x in sp[1:3]) and sp[1] >= 0 and 0 < sp[2] <= size - sp[1]):
                raise PlanError(f"chunk index: span {i} is not [key, offset, nbytes, crc32c] inside the {size}-byte segment")
    plan = _decode(doc.get("plan"), buffer)
    crcs = doc.get("crc32c")
    if not isinstance(crcs, list) or len(crcs) != len(plan.plan.requests) or not all(_crc(c) for c in crcs):
        raise PlanError("chunk index: expected a crc32c (or null) per request of its plan")
    return ChunkIndex(spans, plan, crcs)  # each span a checked list [key, offset, nbytes, crc32c]


def _decode(doc: Any, buffer: torch.Tensor) -> DecodedPlan:
    if not isinstance(doc, dict) or doc.get("version") != PLAN_VERSION:
        raise PlanError(f"plan: expected an object of version {PLAN_VERSION}")
    for key, kind in (("arrays", list), ("metadata", list), ("values", dict), ("tensors", list), ("requests", list)):
        if not isinstance(doc.get(key), kind):
            raise PlanError(f"plan.{key}: expected a {kind.__name__}")
    arrays: dict[str, ArraySpec] = {}
    try:
        for i, a in enumerate(doc["arrays"]):
            spec = ArraySpec.from_dict(a, f"plan.arrays[{i}]")
            if len(spec.shape) > _MAX_DIMS:
                raise PlanError(f"plan.arrays[{i}]: too many dimensions")
            dtype_of(spec.dtype)
            arrays[spec.path] = spec
    except ManifestError as e:
        raise PlanError(str(e)) from None
    metadata = []
    for p in doc["metadata"]:
        if not isinstance(p, str) or p not in arrays:
            raise PlanError(f"plan.metadata: {p!r} is not an array of the plan")
        metadata.append(arrays[p])
    size = buffer.numel()
    views: list[torch.Tensor] = []
    end = 0
    for i, t in enumerate(doc["tensors"]):
        if not isinstance(t, list) or len(t) != 3:
            raise PlanError(f"plan.tensors[{i}]: expected [offset, dtype, shape]")
        offset, dt, shape = t
        dtype = dtype_of(dt)
        shape = _ints(shape, f"plan.tensors[{i}].shape")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset % dtype.itemsize:
            raise PlanError(f"plan.tensors[{i}]: bad offset {offset!r}")
        n = math.prod(shape) * dtype.itemsize
        if offset + n > size:
            raise PlanError(f"plan.tensors[{i}]: bytes {offset}..{offset + n} lie outside the {size}-byte segment")
        end = max(end, offset + n)
        views.append(buffer[offset : offset + n].view(dtype).view(shape))
    requests = []
    for i, r in enumerate(doc["requests"]):
        if not isinstance(r, list) or len(r) != 5:
            raise PlanError(f"plan.requests[{i}]: expected [path, index, tensor, slices, chunk_shape]")
        path, index, ti, slices, chunk_shape = r
        spec = arrays.get(path) if isinstance(path, str) else None
        if spec is None:
            raise PlanError(f"plan.requests[{i}]: {path!r} is not an array of the plan")
        index = _ints(index, f"plan.requests[{i}].index")
        chunk_shape = _ints(chunk_shape, f"plan.requests[{i}].chunk_shape", minimum=1)
        if isinstance(ti, bool) or not isinstance(ti, int) or not 0 <= ti < len(views):
            raise PlanError(f"plan.requests[{i}]: no tensor {ti!r}")
        view = views[ti]
        if dtype_name(view.dtype) != spec.dtype or tuple(chunk_shape) != spec.chunk_shape:
            raise PlanError(f"plan.requests[{i}]: dtype or chunk shape differs from array {path!r}")
        if len(index) != len(spec.shape) or any(x >= g for x, g in zip(index, spec.grid_shape)):
            raise PlanError(f"plan.requests[{i}]: chunk index {index} outside the grid of {path!r}")
        if not isinstance(slices, list) or len(slices) != view.dim():
            raise PlanError(f"plan.requests[{i}]: expected {view.dim()} slices")
        sl = []
        for d, s in enumerate(slices):
            s = _ints(s, f"plan.requests[{i}].slices[{d}]", max_len=2)
            if len(s) != 2 or not s[0] <= s[1] <= view.shape[d] or s[1] - s[0] > chunk_shape[d]:
                raise PlanError(f"plan.requests[{i}]: slice {s} out of range")
            sl.append(slice(s[0], s[1]))
        # The chunk keys are spelled as the array's (format 2: "c.i.j"; format 1: "c/i/j").
        requests.append(WriteRequest(path, tuple(index), view, tuple(sl), tuple(chunk_shape), spec.chunk_separator))
    keys = [(r.path, r.index) for r in requests]
    if len(set(keys)) != len(keys):
        raise PlanError("plan.requests: a chunk appears twice")
    containers = doc.get("containers", {})  # absent from a trainer older than container records
    if not isinstance(containers, dict):
        raise PlanError("plan.containers: expected an object")
    return DecodedPlan(SavePlan(arrays, requests, metadata, doc["values"], containers), end)
