"""Turning the objects of a training loop into state dicts, and back.

``state`` given to :class:`~ckpt.Checkpointer` maps names to tensors, nested dicts/lists, JSON
values, and *stateful* objects: ``nn.Module`` (DDP, FSDP2), ``torch.optim.Optimizer``, LR
schedulers, data loaders and anything else with ``state_dict``/``load_state_dict``.

Modules and optimizers go through ``torch.distributed.checkpoint.state_dict``'s helpers, so
optimizer state is keyed by parameter name (not index) and FSDP2 shards stay DTensors.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .errors import LayoutError


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


@dataclass(frozen=True)
class OptimizerState:
    """An optimizer with the model whose parameter names key its state.

    A bare optimizer in the state is paired automatically with the one module of the state;
    with several modules, wrap it: ``{"optim": ckpt.OptimizerState(model, optimizer)}``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        _prefill_adam_state(self.optimizer)
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


def _prefill_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh Adam/AdamW the state its first step would create, as zeros.

    torch.distributed.checkpoint's helpers materialize a fresh optimizer's state by running a
    whole optimizer step on zero gradients (lr 0): for 1 GB of AdamW state that is ~1 s of
    arithmetic on 2 cores, 80% of a restore, only to be overwritten by the load. For the
    optimizers whose state we know (exactly ``torch.optim.Adam`` and ``AdamW``, not
    subclasses) the same tensors are allocated here instead, as zeros (a zero step leaves
    ``step`` 1, and with Adam's coupled weight decay moments of ``wd * p``). Anything else
    keeps the helpers' way.
    """
    if optimizer.state or type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return
    groups = optimizer.param_groups
    if any(p.grad is not None for g in groups for p in g["params"]):
        return  # the helpers leave such an optimizer alone too
    try:
        from torch.optim.optimizer import _get_scalar_dtype
    except ImportError:  # a torch without it: let the helpers initialize
        return
    for g in groups:
        fused, capturable = bool(g.get("fused")), bool(g.get("capturable"))
        for p in g["params"]:
            if not p.requires_grad:
                continue
            st: dict[str, torch.Tensor] = {}
            if fused or capturable:
                st["step"] = torch.zeros((), dtype=_get_scalar_dtype(is_fused=fused), device=p.device)
            else:
                st["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if g.get("amsgrad"):
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            optimizer.state[p] = st


@dataclass(frozen=True)
class ModelState:
    model: nn.Module

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state_dict)


class RNGState:
    """The random number generators of this process (Python, NumPy, torch CPU and CUDA).

    Put one in the state so that a resumed run draws the same random numbers (dropout,
    shuffling) as one that never stopped.

    Generator states are per process, so they are stored as non-tensor values (bytes), which
    the checkpoint keeps per writer: each rank gets back its own state. As tensors they would
    be taken for replicas of one tensor and written by one rank for all.
    """

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"python": _encode_py_rng(random.getstate()), "torch": _to_bytes(torch.get_rng_state())}
        try:
            import numpy as np

            kind, keys, pos, has_gauss, gauss = np.random.get_state()
            out["numpy"] = {"kind": kind, "keys": keys.astype("<u4").tobytes(), "pos": pos,
                            "has_gauss": has_gauss, "gauss": gauss}
        except ImportError:  # pragma: no cover - numpy ships with torch's wheels
            pass
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = [_to_bytes(t) for t in torch.cuda.get_rng_state_all()]
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(_decode_py_rng(state["python"]))
        torch.set_rng_state(_to_byte_tensor(state["torch"]))
        if "numpy" in state:
            import numpy as np

            n = state["numpy"]
            keys = n["keys"]
            keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.frombuffer(keys, dtype="<u4").astype(np.uint32)
            np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_to_byte_tensor(b) for b in state["cuda"]])


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _to_byte_tensor(b: bytes | torch.Tensor) -> torch.Tensor:
    if isinstance(b, torch.Tensor):
        return b.detach().cpu().view(torch.uint8)
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def _encode_py_rng(s: tuple) -> dict[str, Any]:
    version, internal, gauss = s
    return {"version": version, "state": list(internal), "gauss": gauss}


def _decode_py_rng(d: dict[str, Any]) -> tuple:
    return (d["version"], tuple(d["state"]), d["gauss"])


def _is_stateful_object(x: Any) -> bool:
    if isinstance(x, (torch.Tensor, dict, list, tuple, str, bytes, int, float, bool)) or x is None:
        return False
    return isinstance(x, Stateful)


@dataclass(frozen=True, slots=True)
class Expanded:
    """A state with every stateful object replaced by its state dict, and how to give it back."""

    tree: Any
    appliers: tuple[tuple[str, Callable[[Any], None]], ...]
    state: dict[str, Any] | None = None  # the state expanded, whose plain entries ``apply`` sets

    def apply(self) -> None:
        """After loading into ``tree`` in place: hand each object its (loaded) state dict, and
        put the plain entries back into the state (a load replaces non-tensor values, such as
        ``state["step"]``, in ``tree``, a copy of the state's top level)."""
        for key, fn in self.appliers:
            fn(self.tree[key])
        if self.state is not None:
            stateful = {key for key, _ in self.appliers}
            for key, value in self.tree.items():
                if key not in stateful:
                    self.state[key] = value


def expand(state: dict[str, Any]) -> Expanded:
    """Replace modules, optimizers and other stateful objects by their state dicts (top level)."""
    if not isinstance(state, dict):
        raise LayoutError(f"the checkpoint state must be a dict of names to objects, got {type(state).__name__}")
    modules = [v for v in state.values() if isinstance(v, nn.Module)]
    tree: dict[str, Any] = {}
    appliers: list[tuple[str, Callable[[Any], None]]] = []
    for key, value in state.items():
        obj = value
        if isinstance(value, nn.Module):
            obj = ModelState(value)
        elif isinstance(value, torch.optim.Optimizer):
            if len(modules) != 1:
                raise LayoutError(
                    f"state[{key!r}] is an optimizer and the state has {len(modules)} modules: wrap it as "
                    f"ckpt.OptimizerState(model, optimizer) so its state is keyed by parameter name"
                )
            obj = OptimizerState(modules[0], value)
        if _is_stateful_object(obj):
            tree[key] = obj.state_dict()
            appliers.append((key, obj.load_state_dict))
        else:
            tree[key] = value
    return Expanded(tree, tuple(appliers), state)


# -- repeated saves: the same state dicts without the helpers' per-call cost ----------------------


def _same_tensor(a: Any, b: Any) -> bool:
    """Whether two state-dict tensors are views of the same memory with the same layout."""
    if type(a) is not type(b) and not (isinstance(a, nn.Parameter) or isinstance(b, nn.Parameter)):
        return False
    la = a.to_local() if hasattr(a, "to_local") else a
    lb = b.to_local() if hasattr(b, "to_local") else b
    try:
        return (la.data_ptr() == lb.data_ptr() and la.shape == lb.shape and la.dtype == lb.dtype
                and la.stride() == lb.stride() and la.device == lb.device and a.shape == b.shape)
    except RuntimeError:
        return False


def _same_tree(a: Any, b: Any) -> bool:
    """``a`` and ``b`` hold the same keys in the same order, the same tensors and equal values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _same_tensor(a, b)
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b)
                and all(_same_tree(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(_same_tree(x, y) for x, y in zip(a, b)))
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - incomparable values: not the same
        return False


def _module_signature(model: nn.Module) -> tuple:
    return tuple((len(m._parameters), len(m._buffers)) for m in model.modules())


def _fast_model(model: nn.Module, reference: dict[str, Any]) -> Callable[[], dict[str, Any]] | None:
    """A direct walk giving ``reference`` (the helpers' model state dict), or None."""
    by_memory: dict[tuple, tuple[nn.Module, str]] = {}
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is not None:
                    local = t.to_local() if hasattr(t, "to_local") else t
                    by_memory.setdefault((local.data_ptr(), tuple(t.shape), t.dtype), (mod, name))
    recipe: list[tuple[str, nn.Module, str]] = []
    for key, t in reference.items():
        if not isinstance(t, torch.Tensor):
            return None
        local = t.to_local() if hasattr(t, "to_local") else t
        found = by_memory.get((local.data_ptr(), tuple(t.shape), t.dtype))
        if found is None:
            return None
        recipe.append((key, *found))
    signature = _module_signature(model)

    def fast() -> dict[str, Any] | None:
        if _module_signature(model) != signature:
            return None
        return {key: getattr(mod, name).detach() for key, mod, name in recipe}

    out = fast()
    return fast if out is not None and _same_tree(out, reference) else None


def _optimizer_signature(optimizer: torch.optim.Optimizer) -> tuple:
    return (len(optimizer.state), sum(len(s) for s in optimizer.state.values()),
            tuple(tuple(map(id, g["params"])) for g in optimizer.param_groups))


def _fast_optimizer(optimizer: torch.optim.Optimizer, reference: dict[str, Any]) -> Callable[[], dict[str, Any]] | None:
    """A direct walk giving ``reference`` (the helpers' optimizer state dict), or None."""
    groups = reference.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        return None
    names: list[tuple[torch.Tensor, str]] = []
    for live, ref in zip(optimizer.param_groups, groups):
        if len(live["params"]) != len(ref.get("params", ())):
            return None
        names.extend(zip(live["params"], ref["params"]))
    group_names = [list(ref["params"]) for ref in groups]
    signature = _optimizer_signature(optimizer)

    def fast() -> dict[str, Any] | None:
        if _optimizer_signature(optimizer) != signature:
            return None
        state = {}
        for p, name in names:
            s = optimizer.state.get(p)
            if s:
                state[name] = dict(s)
        param_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(n)}
                        for g, n in zip(optimizer.param_groups, group_names)]
        return {"state": state, "param_groups": param_groups}

    out = fast()
    return fast if out is not None and _same_tree(out, reference) else None


class CachedExpander:
    """:func:`expand` for a training loop that saves the same objects again and again.

    The first expansion of a module or optimizer goes through the state-dict helpers; it
    also builds a direct walk (attributes of the module, ``optimizer.state``) and keeps it
    only if it gives exactly the helpers' answer: the same keys in the same order, the very
    same tensors, equal values. Later saves take the walk while the object's structure is
    unchanged (parameter, buffer and state counts), and go back to the helpers otherwise.
    The helpers cost milliseconds per call for a model of a few hundred tensors, the walk
    tens of microseconds.
    """

    def __init__(self) -> None:
        # (id of the module, or of the optimizer and its module) -> (the objects, the walk or None)
        self._fast: dict[tuple[int, ...], tuple[tuple[Any, ...], Callable[[], Any] | None]] = {}

    def expand(self, state: dict[str, Any]) -> Expanded:
        if not isinstance(state, dict):
            return expand(state)
        modules = [v for v in state.values() if isinstance(v, nn.Module)]
        tree: dict[str, Any] = {}
        appliers: list[tuple[str, Callable[[Any], None]]] = []
        for key, value in state.items():
            if isinstance(value, (nn.Module, torch.optim.Optimizer, ModelState, OptimizerState)):
                obj = value
                if isinstance(value, nn.Module):
                    obj = ModelState(value)
                elif isinstance(value, torch.optim.Optimizer):
                    if len(modules) != 1:
                        return expand(state)  # raises the explanatory error
                    obj = OptimizerState(modules[0], value)
                tree[key] = self._state_dict(obj)
                appliers.append((key, obj.load_state_dict))
            elif _is_stateful_object(value):
                tree[key] = value.state_dict()
                appliers.append((key, value.load_state_dict))
            else:
                tree[key] = value
        return Expanded(tree, tuple(appliers), state)

    def _state_dict(self, obj: ModelState | OptimizerState) -> Any:
        objects = (obj.model,) if isinstance(obj, ModelState) else (obj.optimizer, obj.model)
        key = tuple(map(id, objects))
        cached = self._fast.get(key)
        if cached is not None and all(a is b for a, b in zip(cached[0], objects)) and cached[1] is not None:
            out = cached[1]()
            if out is not None:
                return out
        reference = obj.state_dict()
        if isinstance(obj, ModelState):
            fast = _fast_model(obj.model, reference)
        else:
            fast = _fast_optimizer(obj.optimizer, reference)
        self._fast[key] = (objects, fast)
        return reference
