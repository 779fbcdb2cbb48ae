"""``ckpt.save`` and ``ckpt.load``, and the layer under them that later parts build on.

Save:  ``plan_save`` (pure) -> ``write_plan`` (any process, any order; writes chunks and the
writer's fragment) -> ``commit`` (one committer validates coverage and writes the commit point).
Load:  ``plan_load`` (pure: which chunks overlap each destination shard) -> ``execute_load``.
"""

from __future__ import annotations

import logging
import os
import platform
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from . import format as fmt
from .dist import Group
from .dtypes import info_of
from .errors import CheckpointExistsError, CkptError, StateMismatchError
from .io import ChunkExpectation, read_chunks, request_nbytes, write_chunks
from .layout import Sharded, TensorLayout, layout_of
from .manifest import ArraySpec, Fragment, Manifest
from .planning import CHUNK_SEPARATOR, ReadRequest, WriteRequest, choose_chunk_shape, plan_array_reads, plan_array_writes
from .state import decode_value, encode_value, flatten, set_leaf
from .storage import RetryPolicy, Storage, open_storage

log = logging.getLogger(__name__)

DEFAULT_MAX_CHUNK_BYTES = 16 << 20
DEFAULT_IO_THREADS = 8


def library_versions() -> dict[str, str]:
    from . import __version__

    return {"ckpt": __version__, "torch": torch.__version__, "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------
# Save


@dataclass(frozen=True, slots=True)
class SavePlan:
    """What one process writes: its view of every array, its chunks, its non-tensor values."""

    arrays: dict[str, ArraySpec]
    requests: list[WriteRequest]
    metadata: list[ArraySpec]  # arrays whose zarr.json this process writes (it owns chunk 0)
    values: dict[str, Any] = field(default_factory=dict)

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
        chunk = choose_chunk_shape(layout.global_shape, layout.all_boxes, info.itemsize, max_chunk_bytes)
        spec = ArraySpec(
            path=item.path, shape=layout.global_shape, dtype=info.name, chunk_shape=chunk, layout=layout.description,
            chunk_separator=CHUNK_SEPARATOR,
        )
        arrays[item.path] = spec
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
    return plan_items(items, values, max_chunk_bytes=max_chunk_bytes)


def write_plan(
    storage: Storage,
    plan: SavePlan,
    *,
    step: int,
    writer: str,
    save_id: str,
    threads: int = DEFAULT_IO_THREADS,
    durable: bool = True,
    progress: Callable[[int], None] | None = None,
) -> Fragment:
    """Write this process's chunks and array metadata, then its fragment (last).

    With ``durable``, everything the fragment points to is durable before the fragment is
    written: one barrier for all files where the storage offers one (``Storage.sync``: a
    single ``syncfs`` on Linux), an ``fsync`` per file otherwise.
    """
    defer = durable and storage.can_sync
    per_file = durable and not defer
    # Many small files: in parallel, not one after the other.
    if threads > 1 and len(plan.metadata) > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(plan.metadata)), thread_name_prefix="ckpt-io") as pool:
            list(pool.map(lambda spec: fmt.write_array_metadata(storage, step, spec, durable=per_file), plan.metadata))
    else:
        for spec in plan.metadata:
            fmt.write_array_metadata(storage, step, spec, durable=per_file)
    prefix = fmt.step_dir(step)
    records = write_chunks(storage, prefix, plan.requests, threads=threads, durable=per_file, progress=progress)
    if defer:
        paths = [fmt.array_metadata_path(step, spec) for spec in plan.metadata]
        paths += [f"{prefix}/{r.key}" for r in plan.requests]
        storage.sync(paths)
    fragment = Fragment(
        step=step,
        save_id=save_id,
        writer=writer,
        created_at=time.time(),
        arrays=plan.arrays,
        chunks={p: tuple(r) for p, r in records.items()},
        values=plan.values,
    )
    fmt.write_fragment(storage, fragment)
    return fragment


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
            return seq if any(a is not b for a, b in zip(seq, x)) else x
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
) -> Manifest:
    """Save ``state_dict`` as checkpoint ``step`` of the run at ``url``; returns its manifest.

    Synchronous and collective: in a distributed job every process of ``process_group``
    (default: the world) calls it with its own shards (tensors, DTensors, :class:`Sharded`);
    replicated tensors are written once. Returns after the checkpoint is committed.
    """
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
            write_plan(
                storage, plan, step=step, writer=fmt.writer_name(group.global_rank), save_id=save_id,
                threads=io_threads, durable=durable, progress=bar.update,
            )
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
            result = fmt.commit(
                storage, step, [fmt.writer_name(r) for r in group.global_ranks], save_id=save_id,
                library_versions=library_versions(), user_metadata=user_metadata,
            )
        except Exception as e:
            result = e
    result = group.broadcast(result.to_dict() if isinstance(result, Manifest) else result)
    if isinstance(result, BaseException):
        raise result
    return Manifest.from_dict(result)


# ---------------------------------------------------------------------------------------------
# Load


@dataclass(frozen=True, slots=True)
class LoadPlan:
    step: int
    requests: list[ReadRequest]
    values: dict[str, Any]  # path -> encoded JSON value to set
    arrays: dict[str, ArraySpec]

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
) -> LoadPlan:
    """Pure: which chunks to read into which destination regions; every mismatch at once."""
    problems: list[str] = []
    requests: list[ReadRequest] = []
    values: dict[str, Any] = {}
    seen: set[str] = set()
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
        local, layout = layout_of(leaf, rank=rank, world=1)
        dtype = str(local.dtype).removeprefix("torch.")
        if layout.global_shape != spec.shape:
            problems.append(f"{path!r}: shape {list(spec.shape)} in the checkpoint, {list(layout.global_shape)} in the state")
            continue
        if dtype != spec.dtype and not allow_cast:
            problems.append(f"{path!r}: dtype {spec.dtype} in the checkpoint, {dtype} in the state (allow_cast=True converts)")
            continue
        requests.extend(plan_array_reads(path, spec, local, layout.pieces))
        if isinstance(leaf, Sharded) and leaf.logical_size is not None:
            _zero_padding(leaf)
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
    return LoadPlan(manifest.step, requests, values, manifest.arrays)


def _zero_padding(leaf: Sharded) -> None:
    """Rows of a padded dimension past the logical size hold no data: make them zeros."""
    d = leaf.dim % leaf.tensor.dim()  # type: ignore[operator]
    local = leaf.tensor.shape[d]
    start = leaf.rank * local
    valid = max(0, min(leaf.logical_size or 0, start + local) - start)
    if valid < local:
        leaf.tensor.detach().narrow(d, valid, local - valid).zero_()


def execute_load(
    storage: Storage,
    state_dict: Any,
    plan: LoadPlan,
    *,
    allow_pickle: bool = False,
    threads: int = DEFAULT_IO_THREADS,
    progress: Callable[[int], None] | None = None,
) -> None:
    dtypes = {p: getattr(torch, a.dtype) for p, a in plan.arrays.items()}
    read_chunks(storage, fmt.step_dir(plan.step), plan.requests, lambda r: ChunkExpectation(dtypes[r.path]), threads=threads, progress=progress)
    for path, encoded in plan.values.items():
        set_leaf(state_dict, path, decode_value(encoded, allow_pickle=allow_pickle, where=path))


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
    plan = plan_load(
        state_dict, manifest, rank=group.rank, world=group.world,
        writer=fmt.writer_name(group.global_rank), strict=strict, allow_cast=allow_cast,
    )
    with _progress_bar(progress and group.rank == 0, plan.nbytes, f"load step {step}") as bar:
        execute_load(storage, state_dict, plan, allow_pickle=allow_pickle, threads=io_threads, progress=bar.update)
    return step
