"""``ckpt.save``, ``ckpt.load`` and ``ckpt.read``: the public entry points, and nothing else.

Save:  ``ckpt.plan.plan_save`` (pure) -> ``ckpt.commit.persist`` (every rank: chunks, then its
fragment) -> ``ckpt.commit.commit`` (rank 0 validates coverage and writes the commit point).
Load:  ``ckpt.plan.plan_load`` (pure: which chunks overlap each destination shard) ->
``ckpt.io.execute_load``.
Read:  every (selected) array read whole into a new tensor by the same executor, the values
decoded, and the tree rebuilt with the containers the manifest records (``ckpt.state.unflatten``).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import uuid
from collections.abc import Sequence
from typing import Any

import torch

from . import format as fmt
from .commit import commit
from .consolidate import consolidate
from .dist import Group
from .dtypes import info_by_name
from .errors import CheckpointExistsError, CheckpointNotFoundError, CkptError
from .gcpause import without_gc
from .io import DEFAULT_IO_THREADS, ChunkExpectation, execute_load, read_chunks, write_plan, writer_values
from .layout import Piece, Sharded, whole
from .layouts import ChunkLayout, Locator
from .manifest import Manifest
from .plan import DEFAULT_MAX_CHUNK_BYTES, plan_load, plan_save
from .planning import plan_array_reads
from .state import decode_value, unflatten
from .storage import RetryPolicy, Storage, open_storage
from .version import library_versions

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Save


def _average_replicas(state_dict: Any) -> Any:
    """The state to write: ``Sharded(average=True)`` copies replaced by their mean over the
    replicas' group, in new tensors; the live copies are left as they are (saving must not
    change the training state)."""
    import dataclasses

    import torch.distributed as dist

    def visit(x: Any) -> Any:
        if isinstance(x, Sharded):
            if not (x.average and x.replica[1] > 1):
                return x
            t = x.tensor.detach()
            acc = t.to(torch.float64 if t.is_floating_point() else t.dtype).clone()
            dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=x.group)
            return dataclasses.replace(x, tensor=(acc / x.replica[1]).to(t.dtype))
        if isinstance(x, dict):
            items = {k: visit(v) for k, v in x.items()}
            return items if any(items[k] is not v for k, v in x.items()) else x
        if isinstance(x, (list, tuple)):
            seq = [visit(v) for v in x]
            if not any(a is not b for a, b in zip(seq, x)):
                return x
            return tuple(seq) if isinstance(x, tuple) else seq
        return x

    return visit(state_dict)


def _progress_bar(enabled: bool, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, leave=False)


def save(
    state_dict: Any,
    url: str | os.PathLike[str] | Storage,
    *,
    step: int,
    process_group: Any = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    io_threads: int = DEFAULT_IO_THREADS,
    durable: bool = True,
    user_metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    retry: RetryPolicy | None = None,
    progress: bool = False,
    layout: str = "packs",
) -> Manifest:
    """Save ``state_dict`` as checkpoint ``step`` of the run at ``url``; returns its manifest.

    Synchronous and collective: in a distributed job every process of ``process_group``
    (default: the world) calls it with its own shards (tensors, DTensors, :class:`Sharded`);
    replicated tensors are written once. Returns after the checkpoint is committed.

    ``layout``: ``"packs"`` (every process's chunks in a few files of its own: 2 x processes
    + 1 files, read by ckpt), ``"shards"`` (the same, then consolidated by rank 0 into one zarr
    shard per tensor: any zarr v3 reader opens it) or ``"chunks"`` (one file per chunk, zarr
    readable; many files: for small checkpoints and tools that want them).
    """
    if layout not in ("packs", "shards", "chunks"):
        raise ValueError(f"layout must be 'packs', 'shards' or 'chunks', got {layout!r}")
    storage = open_storage(url, storage_options=storage_options, retry=retry)
    group = Group.resolve(process_group)
    sdir = fmt.step_dir(step)

    # Group rank 0 decides what to do with an existing step, so every rank agrees.
    decision = None
    if group.rank == 0:
        infos = {s.step: s for s in fmt.list_steps(storage)}
        if step in infos and infos[step].committed and not overwrite:
            decision = f"step {step} is already committed in {storage.url}; pass overwrite=True to replace it"
        elif step in infos:
            # An old attempt's leftovers, or overwrite: the commit point goes first, so no reader
            # sees a committed step while its chunks are being deleted.
            storage.delete(f"{sdir}/{fmt.META}")
            storage.delete(sdir, recursive=True)
    decision = group.broadcast((decision, uuid.uuid4().hex))
    if decision[0]:
        raise CheckpointExistsError(decision[0])
    save_id = decision[1]

    error: BaseException | None = None
    try:
        plan = plan_save(
            _average_replicas(state_dict), rank=group.rank, world=group.world, max_chunk_bytes=max_chunk_bytes, allow_pickle=allow_pickle
        )
        with _progress_bar(progress and group.rank == 0, plan.nbytes, f"save step {step}") as bar:
            # Synchronous and collective: a failure is gathered below, no failure marker needed.
            write_plan(storage, plan, step=step, writer=fmt.writer_name(group.global_rank), save_id=save_id,
                       threads=io_threads, durable=durable, progress=bar.update,
                       layout="chunks" if layout == "chunks" else "packs")
    except Exception as e:  # reported to every rank below, then re-raised here
        error = e
    statuses = group.all_gather(None if error is None else f"rank {group.global_rank}: {error}")
    failed = [s for s in statuses if s]
    if failed:
        if error is not None:
            raise error
        raise CkptError(f"save of step {step} failed on other ranks: " + "; ".join(failed))

    result: Any = None
    if group.rank == 0:
        try:
            result = commit(
                storage, step, [fmt.writer_name(r) for r in group.global_ranks], save_id=save_id,
                library_versions=library_versions(), user_metadata=user_metadata,
            )
            if layout == "shards":
                result = consolidate(storage, step, threads=io_threads, durable=durable)
        except Exception as e:
            result = e
    result = group.broadcast(result.to_dict() if isinstance(result, Manifest) else result)
    if isinstance(result, BaseException):
        raise result
    return Manifest.from_dict(result)


# ---------------------------------------------------------------------------------------------
# Load


@without_gc
def load(
    state_dict: Any,
    url: str | os.PathLike[str] | Storage,
    *,
    step: int | None = None,
    process_group: Any = None,
    strict: bool = True,
    allow_pickle: bool = False,
    allow_cast: bool = False,
    io_threads: int = DEFAULT_IO_THREADS,
    storage_options: dict[str, Any] | None = None,
    retry: RetryPolicy | None = None,
    progress: bool = False,
) -> int:
    """Load checkpoint ``step`` (default: newest committed) into ``state_dict`` in place.

    Tensors, DTensors and :class:`Sharded` leaves receive exactly their part of each stored
    tensor, whatever layout it was saved with (only the overlapping chunks are read);
    non-tensor leaves are replaced in their containers. Every chunk read is checked for
    presence and checksum. On error the destination may be partly overwritten. Returns the
    step loaded.
    """
    storage = open_storage(url, storage_options=storage_options, retry=retry)
    group = Group.resolve(process_group)
    if step is None:
        # One rank picks, so a commit landing meanwhile cannot split the job across two steps.
        chosen: Any = None
        if group.rank == 0:
            try:
                chosen = fmt.read_manifest(storage).step
            except CkptError as e:
                chosen = e
        chosen = group.broadcast(chosen)
        if isinstance(chosen, BaseException):
            raise chosen
        step = int(chosen)
    manifest = fmt.read_manifest(storage, step)
    writer = fmt.writer_name(group.global_rank)
    plan = plan_load(
        state_dict, manifest, rank=group.rank, world=group.world, writer=writer, strict=strict,
        allow_cast=allow_cast, writer_values=writer_values(storage, manifest, writer),
    )
    with _progress_bar(progress and group.rank == 0, plan.nbytes, f"load step {step}") as bar:
        execute_load(storage, state_dict, plan, allow_pickle=allow_pickle, threads=io_threads, progress=bar.update)
    return step


# ---------------------------------------------------------------------------------------------
# Read


@without_gc
def read(
    url: str | os.PathLike[str] | Storage,
    *,
    step: int | None = None,
    include: str | Sequence[str] | None = None,
    allow_pickle: bool = False,
    io_threads: int = DEFAULT_IO_THREADS,
    storage_options: dict[str, Any] | None = None,
    retry: RetryPolicy | None = None,
    progress: bool = False,
) -> Any:
    """Read checkpoint ``step`` (default: newest committed) without a template: the nested dict
    of tensors (global shapes, on CPU) and values as they were saved. Lists, tuples and int keys
    come back as such where the checkpoint records them (older checkpoints: dicts with str keys).

    ``include``: globs on the paths (``"model/*"``; ``fnmatch``, so ``*`` also matches ``/``);
    a list or tuple some of whose elements are left out comes back as a dict with int keys.
    Every chunk is checked as by :func:`load`; values that would run code to decode need
    ``allow_pickle``. Per-writer values come back as the first writer saved them.
    """
    storage = open_storage(url, storage_options=storage_options, retry=retry)
    manifest = fmt.read_manifest(storage, step)
    globs = [include] if isinstance(include, str) else list(include or ())

    def wanted(path: str) -> bool:
        return not globs or any(fnmatch.fnmatchcase(path, g) for g in globs)

    arrays = {p: a for p, a in manifest.arrays.items() if wanted(p)}
    values = {p: v for p, v in manifest.values.items() if wanted(p)}
    if globs and not arrays and not values:
        raise CheckpointNotFoundError(f"nothing in step {manifest.step} of {storage.url} matches include={globs}; "
                                      "`ckpt inspect` lists the paths")
    dtypes = {p: info_by_name(a.dtype).torch_dtype for p, a in arrays.items()}
    tensors = {p: torch.empty(a.shape, dtype=dtypes[p]) for p, a in arrays.items()}
    requests = [r for p, a in arrays.items()
                for r in plan_array_reads(p, a, tensors[p], [Piece(whole(a.shape), (0,) * len(a.shape))])]
    locator = Locator(storage, manifest.step, ChunkLayout.of(manifest), manifest.arrays)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with _progress_bar(progress, total, f"read step {manifest.step}") as bar:
        read_chunks(storage, locator, requests, lambda r: ChunkExpectation(dtypes[r.path]), threads=io_threads,
                    progress=bar.update)
    leaves: dict[str, Any] = dict(tensors)
    leaves.update({p: decode_value(v, allow_pickle=allow_pickle, where=p) for p, v in values.items()})
    return unflatten(dict(sorted(leaves.items())), manifest.containers)
