"""``ckpt.dcp.Reader``: DCP's ``StorageReader`` over any committed ckpt step.

``dcp.load(state, storage_reader=ckpt.dcp.Reader(url))`` loads the newest committed step (or
``step=N``), whatever wrote it (``ckpt.save``, the Checkpointer, ``ckpt.dcp.Writer``, an
import) and in whatever layout (packs, shards, chunks), into DCP's state, resharded by DCP's
load planner. DCP calls, in order:

1. every rank: ``read_metadata``: the step as DCP metadata (``ckpt.dcp.metadata.dcp_view``):
   every array one key whose chunks are the ckpt chunk grid, every value the leaves DCP's
   traversal makes of it, the object path of every key as planner data;
2. every rank: ``set_up_storage_reader`` (its rank), ``prepare_local_plan``; the coordinator:
   ``prepare_global_plan``, which checks that every rank read the same step (a commit landing
   between two ranks' reads is reported, not loaded half and half);
3. every rank: ``read_data``: the chunks its read items need, each read once into every
   destination it overlaps, checked (presence, size, crc32c) by ckpt's one executor; values
   handed to DCP as ``torch.save`` bytes of the decoded JSON. A value kept opaque (it needs an
   unpickler) is handed over only with ``allow_pickle=True``, since DCP unpickles what it gets.
"""

from __future__ import annotations

import dataclasses
import io
import os
import uuid
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from .. import format as fmt
from ..dtypes import info_by_name
from ..errors import CkptError
from ..io import DEFAULT_IO_THREADS, ChunkExpectation, read_chunks, writer_values
from ..layouts import ChunkLayout, Locator
from ..manifest import Manifest
from ..planning import ReadRequest, ReadTarget
from ..storage import RetryPolicy, Storage, open_storage
from .metadata import DcpView, dcp_view, value_leaves
from .tree import leaf_bytes


class Reader(StorageReader):
    """Reads committed step ``step`` (default: the newest) of the run at ``url`` for ``dcp.load``.

    ``allow_pickle``: hand DCP the values kept opaque (DCP unpickles them); off by default.
    """

    def __init__(self, url: str | os.PathLike[str], *, step: int | None = None, allow_pickle: bool = False,
                 io_threads: int = DEFAULT_IO_THREADS, storage_options: dict[str, Any] | None = None,
                 retry: RetryPolicy | None = None) -> None:
        super().__init__()
        if step is not None:
            fmt.step_dir(step)
        if io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {io_threads}")
        self.url = os.fspath(url)
        self.step = step
        self.allow_pickle = allow_pickle
        self.io_threads = io_threads
        self.storage_options = storage_options
        self.retry = retry
        self.rank = 0
        self.load_id = uuid.uuid4().hex
        self._storage: Storage | None = None
        self._manifest: Manifest | None = None
        self._view: DcpView | None = None
        self._own_values: dict[str, tuple[str, Any]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_storage": None}

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = open_storage(self.url, storage_options=self.storage_options, retry=self.retry)
        return self._storage

    @property
    def checkpoint_id(self) -> str:
        return self.url if self.step is None else f"{self.url}#step={self.step}"

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False  # DCP picks backends by checkpoint_id among its own classes: pass an instance

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """A new load begins; a ``checkpoint_id`` given to ``dcp.load`` is the run URL."""
        if checkpoint_id:
            self.url = os.fspath(checkpoint_id)
            self._storage = None
        self._manifest = self._view = self._own_values = None
        self.load_id = uuid.uuid4().hex

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        manifest = fmt.read_manifest(self.storage, self.step)
        self._manifest = manifest
        self._view = dcp_view(manifest, checkpoint_id=self.storage.url)
        return self._view.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        rank = kwargs.get("rank")
        if rank is None:
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.rank = int(rank)
        self._own_values = None

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return dataclasses.replace(plan, storage_data=self._loaded().step)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        steps = {p.storage_data for p in plans}
        if len(steps) > 1:
            raise CkptError(f"ranks read different steps {sorted(steps)} of {self.url} (a step was committed while "
                            "they read); pass step=N to ckpt.dcp.Reader")
        return plans

    def _loaded(self) -> Manifest:
        if self._manifest is None or self._view is None:
            raise CkptError("read_metadata was not called before reading")
        return self._manifest

    def _value_leaf(self, fqn: str) -> tuple[str, Any]:
        """This rank's leaf for a value key: its own writer's copy where writers differ."""
        assert self._view is not None
        if self._own_values is None:
            manifest = self._loaded()
            own = writer_values(self.storage, manifest, fmt.writer_name(self.rank)) or {}
            self._own_values = {k: (p, leaf) for k, (p, leaf, _op) in value_leaves(manifest, own).items()}
        return self._own_values.get(fqn) or self._view.values[fqn]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        manifest = self._loaded()
        assert self._view is not None
        targets: dict[tuple[str, tuple[int, ...]], list[ReadTarget]] = {}
        pending = []
        for item in plan.items:
            fqn = item.storage_index.fqn
            if item.type == LoadItemType.BYTE_IO:
                path, leaf = self._value_leaf(fqn)
                data = leaf_bytes(leaf, allow_pickle=self.allow_pickle, where=path)
                planner.load_bytes(item, io.BytesIO(data))
                continue
            path = self._view.tensors[fqn]
            spec = manifest.arrays[path]
            offsets = tuple(item.storage_index.offset or ())
            index = tuple(o // c for o, c in zip(offsets, spec.chunk_shape))
            dst = planner.resolve_tensor(item).detach()
            src = tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths))
            targets.setdefault((path, index), []).append(ReadTarget(dst, tuple(slice(0, n) for n in item.lengths), src))
            pending.append((item, dst))
        requests = [ReadRequest(p, i, manifest.arrays[p].chunk_shape, tuple(t), manifest.arrays[p].chunk_separator)
                    for (p, i), t in sorted(targets.items())]
        dtypes = {p: info_by_name(manifest.arrays[p].dtype).torch_dtype for p, _i in targets}
        locator = Locator(self.storage, manifest.step, ChunkLayout.of(manifest), manifest.arrays)
        read_chunks(self.storage, locator, requests, lambda r: ChunkExpectation(dtypes[r.path]),
                    threads=self.io_threads)
        for item, dst in pending:
            planner.commit_tensor(item, dst)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut
