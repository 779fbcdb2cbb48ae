"""``ckpt.dcp.Writer``: DCP's ``StorageWriter`` that writes a committed ckpt step.

``dcp.save(state, storage_writer=ckpt.dcp.Writer("s3://b/run", step=100))`` (and
``dcp.async_save``, thread or process mode) writes step 100 of the run in ckpt's format: every
chunk with its crc32c, a fragment per rank, the commit point last. DCP calls, in order:

1. every rank: ``set_up_storage_writer`` (its rank), ``prepare_local_plan`` (the rank's value
   keys, before DCP keeps one copy of each);
2. the coordinator: ``prepare_global_plan``. DCP's global plan holds every rank's slice of every
   tensor with its global shape and dtype, which is what a ckpt chunk grid needs: per array, a
   grid dividing every slice boundary (each chunk has one writer), bounded by
   ``max_chunk_bytes``. DCP's value leaves are regrouped into ckpt values (``ckpt.dcp.tree``),
   each group written by one rank that holds all of it. An existing committed step is refused
   here unless ``overwrite``; the leftovers of a failed attempt are removed;
3. every rank: ``write_data``: its slices cut into chunks and written (``ckpt.io.write_plan``,
   packs by default), then its fragment;
4. the coordinator: ``finish``: ``ckpt.commit.commit`` validates that every chunk was written
   once and writes the commit point; with ``layout="shards"`` (the default) the step is then
   consolidated into one zarr shard per array, so tensorstore and zarr-python read it as well
   as ``ckpt.load`` and the CLI.

Why consolidate by default rather than write one file per chunk: a DCP job writes a step as
packs, one sequential stream per rank (2 x ranks + 1 objects, like DCP's own file per rank),
and the coordinator rewrites it into about two objects per array; one file per chunk
(``layout="chunks"``) is zarr-readable without that second pass but costs arrays x ranks
objects. ``layout="packs"`` skips consolidation (ckpt reads it; ``ckpt consolidate`` later).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from .. import format as fmt
from ..commit import commit
from ..consolidate import consolidate
from ..dtypes import info_of
from ..errors import CheckpointExistsError, CkptError, LayoutError
from ..format import CHUNK_SEPARATOR
from ..io import DEFAULT_IO_THREADS, write_plan
from ..layout import Box, Piece, TensorLayout
from ..manifest import ArraySpec
from ..plan import DEFAULT_MAX_CHUNK_BYTES
from ..plan import SavePlan as CkptSavePlan
from ..planning import chunk_shape_for, plan_array_writes
from ..retention import delete_step
from ..state import encode_value
from ..storage import RetryPolicy, Storage, open_storage
from ..version import library_versions
from .tree import ObjPath, assemble, ckpt_path, decode_leaf, list_containers, value_groups

LAYOUTS = ("shards", "packs", "chunks")


@dataclass(frozen=True, kw_only=True, slots=True)
class WriterOptions:
    """How a :class:`Writer` writes (validated on construction)."""

    layout: str = "shards"
    overwrite: bool = False
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
    io_threads: int = DEFAULT_IO_THREADS
    durable: bool = True
    user_metadata: dict[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] | None = None
    retry: RetryPolicy | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.max_chunk_bytes < 1:
            raise ValueError(f"max_chunk_bytes must be >= 1, got {self.max_chunk_bytes}")
        if self.io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {self.io_threads}")


@dataclass(frozen=True, slots=True)
class _LocalData:
    """What a rank tells the coordinator beyond DCP's plan: the value keys it holds."""

    values: frozenset[str]


@dataclass(frozen=True, slots=True)
class _RankData:
    """What the coordinator tells each rank: the save, the arrays it writes, the values it
    writes (ckpt value path -> DCP keys), the containers."""

    save_id: str
    world: int
    arrays: dict[str, ArraySpec]  # DCP key -> the array (grid chosen by the coordinator)
    groups: dict[str, list[str]]
    containers: dict[str, Any]


class Writer(StorageWriter):
    """Writes ``dcp.save``'s state as committed step ``step`` of the run at ``url``.

    Options (keywords): ``layout`` (``"shards"``, default: consolidated, any zarr v3 reader
    opens it; ``"packs"``: readable by ckpt; ``"chunks"``: one file per chunk), ``overwrite``
    (replace a committed step), ``max_chunk_bytes``, ``io_threads``, ``durable``,
    ``user_metadata``, ``storage_options``, ``retry``. One writer per save: a new step, a new
    ``Writer``. Picklable (DCP's process-mode ``async_save`` sends it to its process).
    """

    def __init__(self, url: str | os.PathLike[str], *, step: int, **options: Any) -> None:
        super().__init__()
        fmt.step_dir(step)  # validates the step
        self.url = os.fspath(url)
        self.step = step
        self.options = WriterOptions(**options)
        self.rank = 0
        self.is_coordinator = True
        self.save_id = uuid.uuid4().hex
        self._storage: Storage | None = None
        self._paths: dict[str, ObjPath] = {}
        self._world = 1

    # DCP's process-mode async_save pickles the writer: storage handles are reopened there.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_storage"] = None
        return state

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = open_storage(self.url, storage_options=self.options.storage_options,
                                         retry=self.options.retry)
        return self._storage

    @property
    def checkpoint_id(self) -> str:
        return f"{self.url}#step={self.step}"

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # DCP picks backends by checkpoint_id among its own classes: pass an instance

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """A new save begins; a ``checkpoint_id`` given to ``dcp.save`` is the run URL."""
        if checkpoint_id:
            self.url = os.fspath(checkpoint_id)
            self._storage = None
        self.save_id = uuid.uuid4().hex

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.checkpoint_id, save_id=self.save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        # DCP passes rank= and use_collectives= only to a method whose ``**`` is named kwargs.
        if not kwargs.get("use_collectives", True):
            raise CkptError("ckpt.dcp.Writer needs dcp.save(..., use_collectives=True): the coordinator chooses "
                            "the chunk grids and commits")
        self.is_coordinator = is_coordinator
        rank = kwargs.get("rank")
        if rank is None:
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.rank = int(rank)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        mapping = plan.planner_data if isinstance(plan.planner_data, Mapping) else {}
        self._paths = {it.index.fqn: tuple(mapping.get(it.index.fqn, (it.index.fqn,))) for it in plan.items}
        values = frozenset(it.index.fqn for it in plan.items if it.type == WriteItemType.BYTE_IO)
        return dataclasses.replace(plan, storage_data=_LocalData(values))

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        if any(not p.usable for p in plans):
            raise CkptError("ckpt.dcp.Writer does not support DCP's plan caching (enable_plan_caching=True)")
        self._prepare_step()
        self._world = len(plans)
        paths: dict[str, ObjPath] = {}
        for p in plans:
            mapping = p.planner_data if isinstance(p.planner_data, Mapping) else {}
            paths.update({it.index.fqn: tuple(mapping.get(it.index.fqn, (it.index.fqn,))) for it in p.items})
        arrays = self._choose_grids(plans, paths)
        tensor_paths = [paths[f] for f in arrays]
        value_keys = {paths[it.index.fqn]: it.index.fqn for p in plans for it in p.items
                      if it.type == WriteItemType.BYTE_IO}
        groups = value_groups(sorted(value_keys, key=str), tensor_paths)
        holders = [p.storage_data.values if isinstance(p.storage_data, _LocalData) else frozenset() for p in plans]
        by_rank: list[dict[str, list[str]]] = [{} for _ in plans]
        for root, members in groups.items():
            keys = [value_keys[m] for m in members]
            rank = next((r for r, held in enumerate(holders) if held.issuperset(keys)), None)
            if rank is None:
                raise CkptError(f"no rank holds all of the value {ckpt_path(root)!r} ({', '.join(sorted(keys))}); "
                                "give every rank the same keys")
            by_rank[rank][ckpt_path(root)] = sorted(keys)
        containers = list_containers(tensor_paths)
        out = []
        for r, p in enumerate(plans):
            items = [it for it in p.items if it.type != WriteItemType.BYTE_IO]
            items += [WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO)
                      for keys in by_rank[r].values() for fqn in keys]
            mine = {it.index.fqn: arrays[it.index.fqn] for it in items if it.index.fqn in arrays}
            out.append(dataclasses.replace(p, items=items, storage_data=_RankData(
                self.save_id, len(plans), mine, by_rank[r], containers)))
        return out

    def _prepare_step(self) -> None:
        """Refuse a committed step (unless overwrite); remove what a failed attempt left."""
        step = next((s for s in fmt.list_steps(self.storage) if s.step == self.step), None)
        if step is None:
            return
        if step.committed and not self.options.overwrite:
            raise CheckpointExistsError(f"step {self.step} is already committed in {self.storage.url}; pass "
                                        "overwrite=True to ckpt.dcp.Writer to replace it")
        delete_step(self.storage, self.step)

    def _choose_grids(self, plans: list[SavePlan], paths: dict[str, ObjPath]) -> dict[str, ArraySpec]:
        """Per tensor, from every rank's slices: a grid dividing every slice boundary."""
        found: dict[str, tuple[tuple[int, ...], torch.dtype, list[int]]] = {}
        for p in plans:
            for it in p.items:
                td = it.tensor_data
                if it.type == WriteItemType.BYTE_IO or td is None:
                    continue
                shape = tuple(td.size)
                have = found.setdefault(it.index.fqn, (shape, td.properties.dtype, [0] * len(shape)))
                if (have[0], have[1]) != (shape, td.properties.dtype):
                    raise LayoutError(f"DCP key {it.index.fqn!r}: ranks disagree on its shape or dtype")
                for d, (o, s) in enumerate(zip(td.chunk.offsets, td.chunk.sizes)):
                    for edge in (o, o + s):
                        if 0 < edge < shape[d]:
                            have[2][d] = math.gcd(have[2][d], edge)
        arrays = {}
        for fqn, (shape, dtype, gcd) in found.items():
            info = info_of(dtype)
            chunk = chunk_shape_for(shape, gcd, info.itemsize, self.options.max_chunk_bytes)
            arrays[fqn] = ArraySpec(path=ckpt_path(paths[fqn]), shape=shape, dtype=info.name, chunk_shape=chunk,
                                    layout={"kind": "dcp"}, chunk_separator=CHUNK_SEPARATOR)
        return arrays

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        data = plan.storage_data
        if not isinstance(data, _RankData):
            raise CkptError("the DCP plan carries no ckpt plan: was prepare_global_plan bypassed?")
        requests, metadata, results = [], [], []
        for it in plan.items:
            if it.type == WriteItemType.BYTE_IO or it.tensor_data is None:
                continue
            spec = data.arrays[it.index.fqn]
            tensor = planner.resolve_data(it)
            box = Box(tuple(it.tensor_data.chunk.offsets), tuple(it.tensor_data.chunk.sizes))
            if tuple(tensor.shape) != box.sizes:
                raise LayoutError(f"DCP key {it.index.fqn!r}: slice of shape {list(tensor.shape)}, its plan says "
                                  f"{list(box.sizes)}")
            layout = TensorLayout(spec.shape, (), (Piece(box, (0,) * len(box.sizes)),))
            mine = plan_array_writes(spec.path, spec, tensor, layout)
            requests.extend(mine)
            if any(not any(r.index) for r in mine):
                metadata.append(spec)
            results.append(WriteResult(index=it.index, size_in_bytes=tensor.numel() * tensor.element_size(),
                                       storage_data=None))
        values: dict[str, Any] = {}
        for path, keys in data.groups.items():
            leaves = {}
            for fqn in keys:
                raw = planner.resolve_data(WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO))
                leaves[self._paths.get(fqn, (fqn,))] = decode_leaf(raw.getvalue())
                results.append(WriteResult(index=MetadataIndex(fqn), size_in_bytes=len(raw.getvalue()),
                                           storage_data=None))
            root = next(iter(leaves))[: len(path.split("/"))]
            values[path] = encode_value(assemble(root, leaves), allow_pickle=False, where=path)
        arrays = {a.path: a for a in data.arrays.values()}
        ckpt_plan = CkptSavePlan(arrays, requests, metadata, values, data.containers)
        write_plan(self.storage, ckpt_plan, step=self.step, writer=fmt.writer_name(self.rank), save_id=data.save_id,
                   threads=self.options.io_threads, durable=self.options.durable,
                   layout="chunks" if self.options.layout == "chunks" else "packs")
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        user = {**self.options.user_metadata, "ckpt.dcp": {"saved_at": time.time(), "dcp_version": metadata.version}}
        commit(self.storage, self.step, [fmt.writer_name(r) for r in range(self._world)], save_id=self.save_id,
               library_versions=library_versions(), user_metadata=user)
        if self.options.layout == "shards":
            consolidate(self.storage, self.step, threads=self.options.io_threads, durable=self.options.durable)
