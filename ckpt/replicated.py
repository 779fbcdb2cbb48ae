"""A restore that reads replicated state once per process group and broadcasts it.

Data-parallel replicas hold the same parameters and optimizer state: restoring, every rank
would read every array from storage (N times the bytes of the state for N ranks, N times the
GETs of an object store). As MegaScale and Orbax do, each array that every rank holds whole (a
plain tensor) is read by one rank only, arrays spread over the ranks by size, and then sent to
the others with one broadcast per reading rank (in buckets of at most ``BUCKET_BYTES``). What
each rank holds a part of (DTensors, ``ckpt.Sharded``) it still reads itself, as before.

The ranks first agree on what they share (the same arrays, shapes and dtypes on every rank, or
everybody reads for itself), and, after reading, on whether every read succeeded: a rank whose
read failed makes every rank raise, none is left waiting in a broadcast.

``mode``: ``"once"``, ``"each"`` (every rank reads everything), or ``"auto"``: once when the
chunks come from storage; each when a node agent's memory serves the restore (a local memory
copy is faster than a broadcast).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from . import format as fmt
from .direct import load_direct
from .dist import Group
from .errors import CkptError
from .gcpause import without_gc
from .io import execute_load, writer_values
from .plan import LoadPlan, plan_load
from .restore import RestoreSource, Tier
from .state import flatten
from .storage import Storage

log = logging.getLogger(__name__)

BUCKET_BYTES = 256 << 20
MODES = ("auto", "once", "each")


def _reads_memory(storage: Storage) -> bool:
    return isinstance(storage, RestoreSource) and any(
        t.tier in (Tier.AGENT_MEMORY, Tier.PEER) for t in storage.tiers())


def _whole_tensors(state_dict: Any) -> dict[str, torch.Tensor]:
    """The leaves every rank holds whole: plain tensors (not DTensors, not ``Sharded``)."""
    return {path: leaf for path, leaf, is_tensor in flatten(state_dict) if is_tensor and type(leaf) is torch.Tensor}


@without_gc
def load_step(storage: Storage, state_dict: Any, step: int, *, group: Group, writer: str | None,
              strict: bool = True, allow_pickle: bool = False, threads: int = 8, mode: str = "auto") -> dict[str, int]:
    """Load committed ``step`` into ``state_dict`` on every rank of ``group`` (all call it).
    Returns ``{"read": bytes this rank read, "received": bytes it got by broadcast}``."""
    if mode not in MODES:
        raise ValueError(f"replicated reads must be one of {MODES}, got {mode!r}")
    once = group.distributed and group.pg is not None and (mode == "once" or (mode == "auto" and not _reads_memory(storage)))
    if not once and isinstance(storage, RestoreSource):
        read = load_direct(storage, state_dict, step, strict=strict, allow_pickle=allow_pickle)
        if read is not None:  # every tensor straight from memory, in one pass
            return {"read": read, "received": 0}
    manifest = fmt.read_manifest(storage, step)
    plan = plan_load(state_dict, manifest, rank=group.rank, writer=writer, strict=strict,
                     writer_values=writer_values(storage, manifest, writer))
    shared = _agree(plan, state_dict, group) if once else {}
    owner = _assign(shared, group.world)
    mine = dataclasses.replace(plan, requests=[r for r in plan.requests if owner.get(r.path, group.rank) == group.rank])
    error: BaseException | None = None
    try:
        execute_load(storage, state_dict, mine, allow_pickle=allow_pickle, threads=threads)
    except BaseException as e:  # the others learn of it before any broadcast
        if not shared:
            raise
        error = e
    read = mine.nbytes
    if not shared:
        return {"read": read, "received": 0}
    failed = [f for f in group.all_gather(None if error is None else f"rank {group.rank}: {type(error).__name__}: {error}")
              if f is not None]
    if error is not None:
        raise error
    if failed:
        raise CkptError(f"restore of step {step}: another rank's read failed ({failed[0]}); nothing was broadcast")
    received = _broadcast(shared, owner, group)
    log.info("restore of step %d: read %.1f MB, received %.1f MB by broadcast (arrays every rank holds, read once)",
             step, read / 1e6, received / 1e6)
    return {"read": read, "received": received}


def _agree(plan: LoadPlan, state_dict: Any, group: Group) -> dict[str, torch.Tensor]:
    """The whole tensors the plan reads, if every rank has the same ones; else none (each reads)."""
    planned = {r.path for r in plan.requests}
    whole = {p: t for p, t in _whole_tensors(state_dict).items() if p in planned}
    signature = sorted((p, tuple(t.shape), str(t.dtype)) for p, t in whole.items())
    signatures = group.all_gather(signature)
    if any(s != signature for s in signatures):
        log.warning("restore: the ranks hold different whole tensors; every rank reads everything itself")
        return {}
    return whole


def _assign(shared: dict[str, torch.Tensor], world: int) -> dict[str, int]:
    """Each shared array to the rank with the fewest bytes so far, largest first (the same on
    every rank: sorted by size, then path)."""
    load = [0] * world
    owner: dict[str, int] = {}
    for path, t in sorted(shared.items(), key=lambda kv: (-kv[1].numel() * kv[1].element_size(), kv[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[path] = r
        load[r] += t.numel() * t.element_size()
    return owner


def _broadcast(shared: dict[str, torch.Tensor], owner: dict[str, int], group: Group) -> int:
    import torch.distributed as dist

    comm = None if dist.get_backend(group.pg) == "nccl" else torch.device("cpu")
    received = 0
    for src in range(group.world):
        tensors = [shared[p] for p in sorted(p for p, r in owner.items() if r == src)]
        n = broadcast_tensors(tensors, src=group.global_ranks[src], group=group.pg, sender=group.rank == src, comm=comm)
        received += 0 if group.rank == src else n
    return received


def broadcast_tensors(tensors: list[torch.Tensor], *, src: int, group: Any, sender: bool,
                      comm: torch.device | None = None) -> int:
    """Send ``tensors`` of global rank ``src`` into the same-shaped, same-dtype ``tensors`` of
    every other rank of ``group``: one broadcast per bucket of at most ``BUCKET_BYTES`` (not
    one per tensor: thousands of small tensors cost thousands of round trips otherwise), the
    bytes as they are (any dtype). ``comm``: the device the buckets travel on (None: the
    tensors' own). Returns the bytes moved."""
    import torch.distributed as dist

    total = 0
    for bucket in _buckets(tensors):
        nbytes = sum(t.numel() * t.element_size() for t in bucket)
        device = comm or bucket[0].device
        if sender:
            flat = torch.cat([t.detach().reshape(-1).view(torch.uint8).to(device) for t in bucket])
        else:
            flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dist.broadcast(flat, src=src, group=group)
        if not sender:
            pos = 0
            for t in bucket:
                n = t.numel() * t.element_size()
                dst = t.detach()
                if dst.is_contiguous():
                    dst.view(-1).view(torch.uint8).copy_(flat[pos: pos + n])  # bytes: any dtype
                else:
                    tmp = torch.empty(dst.shape, dtype=dst.dtype, device=dst.device)
                    tmp.view(-1).view(torch.uint8).copy_(flat[pos: pos + n])
                    dst.copy_(tmp)
                pos += n
        total += nbytes
    return total


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    out: list[list[torch.Tensor]] = []
    size = BUCKET_BYTES
    for t in tensors:
        n = t.numel() * t.element_size()
        if not out or size + n > BUCKET_BYTES:  # by size alone: the same buckets on every rank
            out.append([])
            size = 0
        out[-1].append(t)
        size += n
    return out
