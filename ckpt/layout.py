"""Where each local tensor sits in its global (logical) tensor.

A :class:`TensorLayout` is the pure description that planning needs: the global shape, the
boundaries between the boxes that processes hold (as one gcd per dimension, so that every
process derives the same chunk grid without talking to the others, in time independent of the
world size), the pieces this process holds, and its position among the replicas of those pieces (so exactly one replica writes each piece, chosen locally
and deterministically, spread over replicas).

Three kinds of layout:

- plain tensors: the whole tensor; in a job of ``world`` processes, replicated on all (DDP);
- DTensors on any DeviceMesh with ``Shard``/``Replicate`` placements (FSDP2, TP, HSDP, 2-D);
- hand-sharded tensors (Megatron style) declared with :class:`Sharded`: shard dim, fused
  sub-parameters with their own widths (QKV, SwiGLU), vocabulary padding, replicated/tied,
  averaged.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
import zlib
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import torch

from .errors import LayoutError


@dataclass(frozen=True, slots=True)
class Box:
    """A hyper-rectangle of a global tensor."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def empty(self) -> bool:
        return any(s == 0 for s in self.sizes)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes))

    def intersect(self, other: Box) -> Box | None:
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(min(a, b) for a, b in zip(self.ends, other.ends))
        if any(h <= l for l, h in zip(lo, hi)) and lo:
            return None
        return Box(lo, tuple(h - l for l, h in zip(lo, hi)))


@dataclass(frozen=True, slots=True)
class Piece:
    """A region of the local tensor that holds ``box`` of the global tensor."""

    box: Box
    local_offsets: tuple[int, ...]

    def local_slices(self, sub: Box | None = None) -> tuple[slice, ...]:
        """Slices of the local tensor holding ``sub`` (a part of ``box``; all of it by default)."""
        sub = sub or self.box
        return tuple(
            slice(lo + (so - bo), lo + (so - bo) + s)
            for lo, so, bo, s in zip(self.local_offsets, sub.offsets, self.box.offsets, sub.sizes)
        )


@dataclass(frozen=True, slots=True)
class TensorLayout:
    global_shape: tuple[int, ...]
    # Per dimension, the gcd of the boundaries between the boxes any process holds (0: none):
    # all a chunk grid with one writer per chunk needs to know of the other processes. Computed
    # arithmetically from the sharding, never by walking the mesh: O(dims), not O(world).
    edges_gcd: tuple[int, ...]
    pieces: tuple[Piece, ...]
    replica_index: int = 0
    replica_count: int = 1
    description: dict[str, Any] = field(default_factory=dict)

    def writes(self, path: str, piece: Piece) -> bool:
        """Whether this process writes ``piece``: one replica per piece, spread by a hash."""
        if self.replica_count == 1:
            return True
        key = f"{path}|{piece.box.offsets}".encode()
        return zlib.crc32(key) % self.replica_count == self.replica_index


def chunk_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """(offset, length) of part ``index`` of ``size`` split in ``parts`` (torch.chunk semantics)."""
    step = -(-size // parts) if parts else 0
    start = min(index * step, size)
    return start, max(0, min(size, start + step) - start)


def split_edges_gcd(start: int, length: int, splits: Sequence[int], total: int) -> int:
    """The gcd of every interior boundary (0 < edge < ``total``) produced by splitting
    ``[start, start + length)`` into ``splits[0]`` parts (torch.chunk semantics), each of those
    into ``splits[1]``, and so on. Arithmetic: the parts of one split are multiples of one step
    apart, so the first part, the second and the last (ragged) one stand for all of them."""
    g0 = start if 0 < start < total else 0
    if not splits or length <= 0:
        return math.gcd(g0, start + length) if 0 < start + length < total else g0
    n, rest = splits[0], splits[1:]
    step = -(-length // n)
    count = -(-length // step)  # parts that are not empty
    g = 0
    for k in (1, 2, count - 1, count):  # representative cut points (k * step, clipped) and the end
        edge = start + min(k * step, length)
        if 1 <= k <= count and 0 < edge < total:
            g = math.gcd(g, edge)
    if 0 < start < total:
        g = math.gcd(g, start)
    for k in {0, 1, count - 1} if count > 0 else ():  # the full parts are alike: the first two and the last
        a, b = start + k * step, start + min((k + 1) * step, length)
        g = math.gcd(g, split_edges_gcd(a, b - a, rest, total))
    return g


def whole(shape: Sequence[int]) -> Box:
    return Box(tuple(0 for _ in shape), tuple(shape))


def plain_layout(tensor: torch.Tensor, *, rank: int = 0, world: int = 1) -> TensorLayout:
    return _plain_layout(tuple(tensor.shape), rank, world)


@functools.lru_cache(maxsize=4096)  # a model's shapes recur (80 layers of the same 9): one each
def _plain_layout(shape: tuple[int, ...], rank: int, world: int) -> TensorLayout:
    box = whole(shape)
    return TensorLayout(
        global_shape=shape,
        edges_gcd=tuple(0 for _ in shape),
        pieces=(Piece(box, tuple(0 for _ in shape)),),
        replica_index=rank,
        replica_count=world,
        description={"kind": "replicated" if world > 1 else "plain", "replicas": world},
    )


# ---------------------------------------------------------------------------------------------
# DTensor


def _placement_tag(p: Any) -> tuple[str, int | None]:
    from torch.distributed.tensor import Partial, Replicate, Shard

    name = type(p).__name__
    if isinstance(p, Shard) and name == "Shard":
        return "shard", p.dim
    if isinstance(p, Replicate):
        return "replicate", None
    if isinstance(p, Partial):
        raise LayoutError(
            "a DTensor with a Partial placement holds unreduced values; call "
            ".redistribute(placements=[Replicate() or Shard(d)]) before saving"
        )
    raise LayoutError(
        f"unsupported DTensor placement {p!r}; supported: Shard(d) and Replicate(). "
        "Redistribute to those before saving"
    )


def dtensor_box(
    global_shape: Sequence[int], mesh_shape: Sequence[int], coord: Sequence[int], tags: Sequence[tuple[str, int | None]]
) -> Box:
    """The box that mesh coordinate ``coord`` holds (torch.chunk semantics, in mesh-dim order)."""
    offsets = [0] * len(global_shape)
    sizes = list(global_shape)
    for mesh_dim, (kind, dim) in enumerate(tags):
        if kind != "shard":
            continue
        assert dim is not None
        start, length = chunk_range(sizes[dim], mesh_shape[mesh_dim], coord[mesh_dim])
        offsets[dim] += start
        sizes[dim] = length
    return Box(tuple(offsets), tuple(sizes))


def dtensor_layout(dt: Any) -> TensorLayout:
    mesh = dt.device_mesh
    shape = tuple(dt.shape)
    ndim = len(shape)
    tags = [_placement_tag(p) for p in dt.placements]
    tags = [(k, (d + ndim if d is not None and d < 0 else d)) for k, d in tags]
    mesh_shape = tuple(mesh.shape)
    ranks = mesh.mesh
    # Boundaries per tensor dim: the mesh dims that shard it split it in mesh-dim order.
    edges = tuple(split_edges_gcd(0, n, [mesh_shape[m] for m, (k, dim) in enumerate(tags) if k == "shard" and dim == d],
                                  n) for d, n in enumerate(shape))
    my_coord = mesh.get_coordinate()
    description = {
        "kind": "dtensor",
        "mesh_shape": list(mesh_shape),
        "mesh_dim_names": list(mesh.mesh_dim_names or ()),
        "placements": [f"S({d})" if k == "shard" else "R" for k, d in tags],
    }
    if my_coord is None:
        return TensorLayout(shape, edges, (), 0, 1, description)
    box = dtensor_box(shape, mesh_shape, my_coord, tags)
    local = dt.to_local()
    if tuple(local.shape) != box.sizes:
        raise LayoutError(
            f"DTensor local shape {tuple(local.shape)} differs from the torch.chunk shard "
            f"{box.sizes} of global shape {shape} for placements {description['placements']}"
        )
    # The replicas of this box: the coordinates that differ from ours on Replicate mesh dims
    # only (a few, whatever the world size); one of them, chosen by rank, writes each piece.
    replicate_dims = [m for m, (k, _d) in enumerate(tags) if k != "shard"]
    replicas = []
    for combo in itertools.product(*(range(mesh_shape[m]) for m in replicate_dims)):
        coord = list(my_coord)
        for m, c in zip(replicate_dims, combo):
            coord[m] = c
        replicas.append(int(ranks[tuple(coord)]))
    replicas.sort()
    me = int(ranks[tuple(my_coord)])
    pieces = () if box.empty else (Piece(box, tuple(0 for _ in shape)),)
    return TensorLayout(shape, edges, pieces, replicas.index(me), len(replicas), description)


# ---------------------------------------------------------------------------------------------
# Hand-sharded tensors (Megatron style)


@dataclass(frozen=True)
class Sharded:
    """Declares how a hand-sharded local tensor maps to its logical tensor.

    Put it in the state dict in place of the tensor, on save and on load:

    - ``Sharded(w, dim=0, rank=tp_rank, world=tp)``: column-parallel (``dim=1``: row-parallel).
    - ``parts=(q, k, v)``: fused sub-parameters with their GLOBAL widths along ``dim``; each is
      sharded on its own across ``world`` and the local tensor is the concatenation of the
      local pieces of each part (QKV, GQA with narrower k/v, SwiGLU's ``(ffn, ffn)``).
      The logical tensor is the concatenation of the whole parts.
    - ``logical_size=V``: the local shards are slices of a PADDED dimension (vocabulary
      padding); the stored tensor has ``V`` rows along ``dim``, padding is dropped on save and
      zero-filled on load.
    - ``dim=None``: not sharded; with ``replica=(i, n)`` one of ``n`` identical copies
      (TP-replicated, or tied weights saved under one name by several pipeline stages).
    - ``average=True``: the ``n`` copies may differ; the stored value is their mean, computed
      over ``group`` (a torch.distributed process group of the ``n`` replicas) at save time.
    - ``replica=(i, n)`` also applies to sharded tensors: the data-parallel replicas of a shard.
    """

    tensor: torch.Tensor
    _: KW_ONLY
    dim: int | None = None
    rank: int = 0
    world: int = 1
    parts: tuple[int, ...] | None = None
    logical_size: int | None = None
    replica: tuple[int, int] = (0, 1)
    average: bool = False
    group: Any = None

    def __post_init__(self) -> None:
        t = self.tensor
        if not isinstance(t, torch.Tensor):
            raise LayoutError(f"Sharded.tensor must be a tensor, got {type(t).__name__}")
        if not (0 <= self.rank < self.world):
            raise LayoutError(f"Sharded: need 0 <= rank < world, got rank={self.rank}, world={self.world}")
        idx, count = self.replica
        if not (0 <= idx < count):
            raise LayoutError(f"Sharded.replica must be (index, count) with 0 <= index < count, got {self.replica}")
        if self.average and count > 1 and self.group is None:
            raise LayoutError("Sharded(average=True) needs group=<process group of the replicas>")
        if self.dim is None:
            if self.world != 1 or self.parts or self.logical_size is not None:
                raise LayoutError("Sharded: world, parts and logical_size need a shard dim")
            return
        if not (-t.dim() <= self.dim < t.dim()):
            raise LayoutError(f"Sharded.dim={self.dim} out of range for a {t.dim()}-d tensor")
        if self.parts is not None and self.logical_size is not None:
            raise LayoutError("Sharded: parts and logical_size cannot be combined")
        local = t.shape[self.dim % t.dim()]
        if self.parts is not None:
            if not self.parts or any(w < 0 for w in self.parts):
                raise LayoutError(f"Sharded.parts must be non-negative widths, got {self.parts}")
            expect = sum(chunk_range(w, self.world, self.rank)[1] for w in self.parts)
            if expect != local:
                raise LayoutError(
                    f"Sharded: parts {self.parts} over world {self.world} give rank {self.rank} "
                    f"{expect} rows along dim {self.dim}, the local tensor has {local}"
                )
        if self.logical_size is not None and not (0 <= self.logical_size <= local * self.world):
            raise LayoutError(
                f"Sharded.logical_size={self.logical_size} exceeds the padded size {local * self.world}"
            )

    def layout(self) -> TensorLayout:
        t = self.tensor
        shape = list(t.shape)
        zeros = tuple(0 for _ in shape)
        idx, count = self.replica
        desc: dict[str, Any] = {"kind": "sharded", "dim": self.dim, "world": self.world, "replicas": count}
        if self.average:
            desc["averaged"] = True
        if self.dim is None:
            box = whole(shape)
            return TensorLayout(tuple(shape), tuple(0 for _ in shape), (Piece(box, zeros),), idx, count, desc)
        d = self.dim % t.dim()
        desc["dim"] = d
        local = shape[d]

        def boxes_of(r: int) -> list[tuple[Box, int]]:  # (global box, local offset along d)
            out = []
            if self.parts is not None:
                part_off = local_off = 0
                for w in self.parts:
                    start, length = chunk_range(w, self.world, r)
                    out.append((_along(shape, d, part_off + start, length), local_off))
                    part_off += w
                    local_off += length
            elif self.logical_size is not None:
                start = r * local
                length = max(0, min(self.logical_size, start + local) - start)
                out.append((_along(shape, d, min(start, self.logical_size), length), 0))
            else:
                out.append((_along(shape, d, r * local, local), 0))
            return out

        if self.parts is not None:
            global_d = sum(self.parts)
            desc["parts"] = list(self.parts)
        elif self.logical_size is not None:
            global_d = self.logical_size
            desc["logical_size"] = self.logical_size
            desc["padded_size"] = local * self.world
        else:
            global_d = local * self.world
        gshape = list(shape)
        gshape[d] = global_d
        edges = [0] * len(shape)
        if self.parts is not None:  # each part split over the world on its own
            offset = 0
            for w in self.parts:
                edges[d] = math.gcd(edges[d], split_edges_gcd(offset, w, [self.world], global_d))
                offset += w
        else:  # shards of ``local`` rows, the last ones clipped by a logical size
            edges[d] = local if 0 < local < global_d else 0
        pieces = tuple(
            Piece(b, tuple(off if i == d else 0 for i in range(len(shape))))
            for b, off in boxes_of(self.rank)
            if not b.empty
        )
        return TensorLayout(tuple(gshape), tuple(edges), pieces, idx, count, desc)


def _along(shape: Sequence[int], dim: int, offset: int, length: int) -> Box:
    offsets = tuple(offset if i == dim else 0 for i in range(len(shape)))
    sizes = tuple(length if i == dim else s for i, s in enumerate(shape))
    return Box(offsets, sizes)


def is_dtensor(x: Any) -> bool:
    # A DTensor exists only once torch.distributed.tensor is imported: importing it just to
    # answer "no" costs 0.5-1.4 s (sympy & co.) on the first save/load of a process.
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return cls is not None and isinstance(x, cls)


def layout_of(value: Any, *, rank: int, world: int) -> tuple[torch.Tensor, TensorLayout]:
    """The local tensor and layout of a state-dict leaf (tensor, DTensor or :class:`Sharded`)."""
    if isinstance(value, Sharded):
        return value.tensor, value.layout()
    if is_dtensor(value):
        return value.to_local(), dtensor_layout(value)
    if isinstance(value, torch.Tensor):
        return value, plain_layout(value, rank=rank, world=world)
    raise LayoutError(f"not a tensor: {type(value).__name__}")
