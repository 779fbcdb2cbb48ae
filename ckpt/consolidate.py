"""Consolidation: a committed step rewritten into the universal zarr layout (``shards``).

Frequent checkpoints are written as per-writer packs (few objects per step, fast to write,
list and delete; readable by ckpt only). The steps that matter beyond the rolling window are
rewritten here into one zarr v3 array per tensor whose single shard (the ``sharding_indexed``
codec) holds every chunk in row-major order, then the shard index: any zarr v3 reader
(tensorstore, zarr-python) opens them, and a step costs about two objects per array. Universal
Checkpointing's "distributed representation for saving, consolidated representation for
loading", done online.

Who consolidates: ``ckpt consolidate`` (any step, by hand), ``ckpt.save(..., layout="shards")``,
and the Checkpointer's committer for the steps retention keeps for good (``keep_every``) and the
last step at ``close()``, in the background.

The rewrite is safe to interrupt: shards and array metadata are written beside the packs, then
the commit point is replaced in one atomic write (the step reads as packs before it, as shards
after), then the packs are deleted. A reader that listed the step as packs before the switch
and reads a pack after its deletion gets a missing-chunk error and reads again.

One process reads every chunk of the step and writes every shard: fine for the steps kept
beyond the rolling window, a cost to know at thousands of writers (see docs/format.md).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import crc32c
import torch

from . import chunks
from . import format as fmt
from .commit import commit_document
from .coverage import intermediate_groups
from .errors import CorruptCheckpointError
from .io import _map
from .layouts import PACKS, SHARDS, ChunkLayout, Locator, grid_index, shard_key
from .manifest import ArraySpec, Manifest
from .restore import read_chunk
from .storage import Storage

log = logging.getLogger(__name__)


class _ShardParts:
    """The bytes of one array's shard, produced chunk by chunk as they are read and checked
    (re-iterable, so a retried write starts again)."""

    def __init__(self, storage: Storage, locator: Locator, spec: ArraySpec, itemsize: int,
                 progress: Callable[[int], None] | None) -> None:
        self.storage, self.locator, self.spec, self.itemsize, self.progress = storage, locator, spec, itemsize, progress

    def __iter__(self) -> Iterator[Any]:
        spec = self.spec
        nbytes = chunks.stored_nbytes(spec.chunk_shape, self.itemsize)
        index = bytearray()
        offset = 0
        buf = torch.empty(nbytes, dtype=torch.uint8)
        data = memoryview(buf.numpy())
        for linear in range(spec.num_chunks):
            idx = grid_index(spec, linear)
            key = self.locator.key(spec.path, idx)
            location = self.locator.locate(spec.path, idx)
            where = f"tensor {spec.path!r} chunk {'.'.join(map(str, idx)) or '()'}"
            try:
                got = read_chunk(self.storage, key, data, location)
            except (FileNotFoundError, EOFError) as e:
                raise CorruptCheckpointError(f"consolidating step {self.locator.step}: {where}: {e}", [where]) from None
            problem = chunks.check(got, nbytes, recorded_crc=location.recorded_crc if location else None)
            if problem is not None:
                raise CorruptCheckpointError(f"consolidating step {self.locator.step}: {where}: {problem}", [where])
            yield data
            yield got.stored_crc.to_bytes(chunks.CRC_BYTES, "little")
            index += struct.pack("<QQ", offset, nbytes + chunks.CRC_BYTES)
            offset += nbytes + chunks.CRC_BYTES
            if self.progress is not None:
                self.progress(nbytes)
        yield bytes(index)
        yield crc32c.crc32c(bytes(index)).to_bytes(chunks.CRC_BYTES, "little")


def consolidate(storage: Storage, step: int, *, threads: int = 8, durable: bool = True,
                progress: Callable[[int], None] | None = None) -> Manifest:
    """Rewrite committed ``step`` into the ``shards`` layout; returns its new manifest. A step
    already consolidated, or written one file per chunk (zarr-readable as it is), is left
    alone."""
    from .dtypes import info_by_name

    manifest = fmt.read_manifest(storage, step)
    if manifest.layout != PACKS:
        return manifest
    locator = Locator(storage, step, ChunkLayout.of(manifest), manifest.arrays)
    sdir = fmt.step_dir(step)
    # Durable before the commit point switches: one barrier for every file where the storage
    # has one (a syncfs), else an fsync per file.
    defer = durable and storage.can_sync
    per_file = durable and not defer

    def write_array(spec: ArraySpec) -> list[str]:
        paths = [fmt.array_metadata_path(step, spec)]
        if spec.num_chunks:
            parts = _ShardParts(storage, locator, spec, info_by_name(spec.dtype).itemsize, progress)
            paths.append(f"{sdir}/{shard_key(spec)}")
            storage.write(paths[-1], parts, durable=per_file)
        storage.write(paths[0], [fmt.dumps(fmt.zarr_array_document(spec, shards=True))], durable=per_file)
        return paths

    written = [p for ps in _map(write_array, list(manifest.arrays.values()), threads, None, lambda _s: 0) for p in ps]
    for g in intermediate_groups(manifest.arrays):
        written.append(f"{sdir}/{g}/{fmt.META}")
        storage.write(written[-1], [fmt.dumps(fmt.group_document())], durable=per_file)
    if defer and written:
        storage.sync(written)
    # The writer runs stay: readers do not need them, but a restore from agents' memory (held by
    # writer) asks only the holders of the writers whose chunks it reads
    new = replace(manifest, layout=SHARDS)
    storage.write_atomic(f"{sdir}/{fmt.META}", fmt.dumps(fmt.seal_root(commit_document(new))))
    storage.delete(f"{sdir}/{fmt.PACKS}", recursive=True)
    log.info("step %d consolidated: %d arrays, zarr-readable", step, len(new.arrays))
    return new


def zarr_readable(manifest: Manifest) -> bool:
    """Whether a zarr v3 reader reads this step as it is (layouts chunks and shards)."""
    return manifest.layout != PACKS


class Consolidator:
    """Consolidates steps in the background, one at a time, at low CPU priority (the
    Checkpointer's committer uses one). A failure is logged and reported in ``errors``; the
    step stays readable as packs."""

    def __init__(self, storage: Storage, *, threads: int, durable: bool, nice: int | None = 10) -> None:
        import queue
        import threading

        self.storage, self.threads, self.durable, self.nice = storage, threads, durable, nice
        self.done: list[int] = []
        self.errors: list[str] = []
        self._q: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="ckpt-consolidate", daemon=True)
        self._thread.start()

    def submit(self, step: int) -> None:
        self._q.put(step)

    def _loop(self) -> None:
        from .sink import lower_thread_priority

        lower_thread_priority(self.nice)
        while (step := self._q.get()) is not None:
            try:
                consolidate(self.storage, step, threads=self.threads, durable=self.durable)
                self.done.append(step)
            except Exception as e:  # noqa: BLE001 - the step stays readable as packs
                if isinstance(e, FileNotFoundError) and not fmt.read_root_exists(self.storage, step):
                    continue  # retention removed it meanwhile
                self.errors.append(f"consolidating step {step}: {type(e).__name__}: {e}")
                log.warning("consolidating step %d failed (it stays readable by ckpt): %s", step, e)

    def close(self, *, last: int | None = None, keep_every: int | None = None) -> None:
        """Consolidate ``last`` (the last committed step of the job) too unless ``keep_every``
        already kept it; finish what was submitted, then stop."""
        if last is not None and not (keep_every and last % keep_every == 0):
            self._q.put(last)  # the last step of the job: zarr-readable
        self._q.put(None)
        self._thread.join()
