"""Live training state, for policy ``heal`` (no rollback): what a worker process keeps of
``train_fn``'s state across the attempts it serves, how it knows whether that state is whole,
and how the ranks of a new attempt copy it from one survivor over the new process group.

``train_fn`` registers its state with ``ctx.resume(state)`` and reports each step it applied
with ``ctx.report(step)``. The process's :class:`LiveSlot` keeps the state (the objects
themselves), the last step applied to it, and whether the attempt ended *between* steps
(``clean``): a collective that failed (a lost peer) or a stop asked by the launcher seen at
``ctx.report``, never inside ``optimizer.step()`` (hooks on every optimizer of the state tell).
The launcher reads each survivor's :class:`LiveState` and the policy chooses the rank whose
state every other rank copies (:func:`share_live_state`) and the step everybody continues from.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ckpt.layout import is_dtensor
from ckpt.replicated import broadcast_tensors
from ckpt.state import container_kinds, flatten, unflatten
from ckpt.stateful import OptimizerState, expand


class Interrupted(BaseException):
    """Raised in a worker's training thread when recovery stops its attempt in place (a
    ``BaseException``, so that ``except Exception`` in ``train_fn`` does not swallow it)."""


@dataclass(frozen=True, slots=True)
class LiveState:
    """What a survivor says of its live state after its attempt was stopped. ``step``: the last
    step applied to the state it registered with ``ctx.resume`` (-1: none yet; ``None``: it
    registered no state, so there is nothing to heal from). ``clean``: the attempt ended between
    two steps (not inside an optimizer step, nor by an interrupt that can land anywhere)."""

    rank: int
    step: int | None
    clean: bool
    why: str = ""  # how the attempt ended

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "step": self.step, "clean": self.clean, "why": self.why}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LiveState:
        return cls(int(d["rank"]), None if d["step"] is None else int(d["step"]), bool(d["clean"]), str(d["why"]))


@dataclass(frozen=True, slots=True)
class HealSpec:
    """How an attempt starts from live state: ``source`` sends its state to ``receivers`` (the
    replacements, and survivors whose state is not at ``step``); everybody continues at
    ``step + 1``."""

    source: int
    step: int
    receivers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.source in self.receivers:
            raise ValueError(f"HealSpec: the source rank {self.source} cannot receive its own state")


class LiveSlot:
    """One worker process's record of ``train_fn``'s live state (see the module's docstring)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None
        self.step: int | None = None
        self.stop = threading.Event()  # the launcher asked to stop at the next step boundary
        self.forced = False  # an interrupt was raised asynchronously: it may have landed mid-step
        self._optimizers: list[torch.optim.Optimizer] = []
        self._hooks: list[Any] = []
        self._in_step = 0
        self._stepped: dict[int, int] = {}  # id(optimizer) -> steps since the last report
        self.receiving = False  # live state being copied in: torn until it is registered
        self.ended: LiveState | None = None

    def begin(self, keep: bool) -> None:
        """A new attempt: keep the state (it heals from it) or drop it (it restores or starts anew)."""
        self.stop.clear()
        self.forced = False
        self.ended = None
        if not keep:
            self.register(None, None)

    def register(self, state: dict[str, Any] | None, step: int | None) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._in_step, self._stepped, self.receiving = [], 0, {}, False
        self.state, self.step = state, step
        self._optimizers = [o for o in (_optimizer(v) for v in (state or {}).values()) if o is not None]
        for opt in self._optimizers:
            self._hooks.append(opt.register_step_pre_hook(self._enter))
            self._hooks.append(opt.register_step_post_hook(self._leave))

    def _enter(self, opt: Any, *_: Any) -> None:
        self._in_step += 1

    def _leave(self, opt: Any, *_: Any) -> None:
        self._in_step -= 1
        self._stepped[id(opt)] = self._stepped.get(id(opt), 0) + 1

    def reported(self, step: int) -> None:
        """``ctx.report(step)``: ``step`` is applied. Raises :class:`Interrupted` if the launcher
        asked this attempt to stop: here the state is whole."""
        if self.state is not None:
            self.step, self._stepped = step, {}
        if self.stop.is_set():
            raise Interrupted()

    def finish(self, rank: int, exc: BaseException | None) -> LiveState:
        """The attempt ended (``exc``: how; None: ``train_fn`` returned): what its state is."""
        step, clean, why = self.step, True, "returned"
        if self.state is None:
            step, why = None, "no live state registered (ctx.resume)"
        elif self.receiving:
            clean, why = False, "stopped while its live state was being copied in"
        elif self.forced:
            clean, why = False, "interrupted asynchronously (it did not stop between steps within interrupt_timeout_s)"
        elif self._in_step:
            clean, why = False, "stopped inside optimizer.step()"
        elif exc is not None and not isinstance(exc, Interrupted) and not _from_collective(exc):
            clean, why = False, f"train_fn raised {type(exc).__name__} outside a collective"
        elif exc is not None:
            why = "stopped at ctx.report" if isinstance(exc, Interrupted) else "its collective failed"
        if clean and step is not None and self._stepped:
            counts = {self._stepped.get(id(o), 0) for o in self._optimizers}
            if counts == {1}:  # the optimizers stepped once since the last report: that step is applied
                step, why = step + 1, why + " (after the optimizer step of a step not reported yet)"
            else:
                clean, why = False, "its optimizers stepped unevenly since the last ctx.report"
        self.ended = LiveState(rank, step, clean, why)
        return self.ended


def _optimizer(value: Any) -> torch.optim.Optimizer | None:
    if isinstance(value, torch.optim.Optimizer):
        return value
    if isinstance(value, OptimizerState):
        return value.optimizer
    return None


def _from_collective(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by a torch.distributed call (its innermost Python frame)."""
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and "torch/distributed/" in last.tb_frame.f_code.co_filename.replace("\\", "/")


def clear_gradients(state: dict[str, Any]) -> None:
    """Zero the gradients of every module and optimizer of ``state``: a survivor's hold the
    step in flight when its attempt stopped, which is redone (or dropped) from the live state."""
    params: list[torch.Tensor] = []
    for v in state.values():
        if isinstance(v, torch.nn.Module):
            params += list(v.parameters())
        elif isinstance(v, OptimizerState):
            params += list(v.model.parameters())
        opt = _optimizer(v)
        if opt is not None:
            params += [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        if p.grad is not None:
            p.grad.detach_()
            p.grad.zero_()


def adopt(kept: dict[str, Any], state: dict[str, Any]) -> None:
    """Load the live state ``kept`` (the objects of the attempt before) into ``state`` (built
    anew by ``train_fn``): a copy in this process's memory."""
    if kept is state:
        return
    src, dst = expand(kept), expand(state)
    dst.tree.clear()
    dst.tree.update(src.tree)
    dst.apply()


def share_live_state(state: dict[str, Any], spec: HealSpec, *, rank: int, world_size: int,
                     device: torch.device) -> tuple[int, float]:
    """Copy rank ``spec.source``'s ``state`` into ``state`` of every rank of ``spec.receivers``
    over the default process group (a subgroup of the source and the receivers when others
    keep their own). Every rank of the group calls it. The source sends the structure and the
    values once (an object broadcast), then each tensor; a receiver receives straight into its
    own tensor where shape, dtype and device match (no copy of a model's parameters), else into
    a new one. Returns ``(bytes received, seconds)``."""
    import torch.distributed as dist

    t0 = time.perf_counter()
    members = sorted({spec.source, *spec.receivers})
    if len(members) == 1:
        return 0, 0.0
    group = dist.new_group(members) if len(members) < world_size else None  # every rank takes part
    if rank not in members:
        return 0, 0.0
    comm = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    expanded = expand(state)
    leaves = list(flatten(expanded.tree))

    def sendable(v: Any) -> bool:
        if is_dtensor(v) or not isinstance(v, torch.Tensor):
            raise TypeError(f"policy heal copies plain tensors (data-parallel replicas), got a {type(v).__name__}; "
                            "use policy 'reload' for sharded state")
        return v.device.type == comm.type

    if rank == spec.source:
        meta = [(p, ("t", tuple(v.shape), str(v.dtype).removeprefix("torch.")) if is_t and sendable(v) else ("v", v))
                for p, v, is_t in leaves]
        dist.broadcast_object_list([{"leaves": meta, "containers": container_kinds(expanded.tree)}],
                                   src=spec.source, group=group)
        broadcast_tensors([v for _p, v, is_t in leaves if is_t and sendable(v)], src=spec.source, group=group,
                          sender=True, comm=comm)
        return 0, time.perf_counter() - t0
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=spec.source, group=group)
    own = {p: v for p, v, is_t in leaves if is_t}
    received: dict[str, Any] = {}
    targets = []
    for path, (kind, *rest) in box[0]["leaves"]:
        if kind == "v":
            received[path] = rest[0]
            continue
        shape, dtype = torch.Size(rest[0]), getattr(torch, rest[1])
        mine = own.get(path)
        ok = isinstance(mine, torch.Tensor) and mine.shape == shape and mine.dtype == dtype \
            and mine.device.type == comm.type and mine.is_contiguous()
        target = mine if ok else torch.empty(shape, dtype=dtype, device=comm)
        received[path] = target
        targets.append(target)
    # In buckets, not one broadcast per tensor (a model with Adam state has thousands).
    nbytes = broadcast_tensors(targets, src=spec.source, group=group, sender=False, comm=comm)
    expanded.tree.clear()
    expanded.tree.update(unflatten(received, box[0]["containers"]))
    expanded.apply()
    return nbytes, time.perf_counter() - t0


def receivers_of(world_size: int, current: Sequence[int]) -> tuple[int, ...]:
    """The ranks of a world of ``world_size`` that must receive: those not in ``current``."""
    have = set(current)
    return tuple(r for r in range(world_size) if r not in have)
