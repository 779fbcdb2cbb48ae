"""Which of torchtitan's state entries a checkpoint saves and loads, and checks on them.

Every entry is handed to ckpt through :class:`StateDictOf`, so each is saved exactly as
torchtitan's own manager saves it: its ``state_dict()``. torchtitan's ``OptimizersContainer``
is a ``torch.optim.Optimizer`` whose ``state_dict`` is already flat and keyed by parameter
name; given bare, ckpt would re-key it through the state-dict helpers.

Loading follows DCP's rule: what the state asks for must be in the checkpoint (every tensor
and value, or a :class:`ckpt.StateMismatchError` names what is missing); what the checkpoint
holds beyond it (an entry excluded from loading) is not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ckpt.errors import StateMismatchError
from ckpt.manifest import Manifest
from ckpt.state import flatten

_MODEL = "model"
RNG = "rng"  # the entry of each rank's random generators (ckpt.RNGState)


@dataclass(frozen=True, eq=False)
class StateDictOf:
    """An object with ``state_dict``/``load_state_dict``, saved as exactly that state dict."""

    obj: Any

    def state_dict(self) -> Any:
        return self.obj.state_dict()

    def load_state_dict(self, state_dict: Any) -> None:
        self.obj.load_state_dict(state_dict)


class LoadedStateDictOf:
    """:class:`StateDictOf` for a restore: once loaded, an entry without tensors answers
    ``state_dict`` with the state it was given instead of asking the object again.

    The Checkpointer prepares the first checkpoint after a restore in a background thread,
    from the state's ``state_dict``s. Asking torchdata's ``StatefulDataLoader`` for its state
    right after a load builds its iterator there: a draw from the global random generator and
    a replay of the dataset, off the training thread, racing the trainer's own ``iter``.
    Entries with tensors (model, optimizer) are asked again: their state dicts hold the live
    tensors the plan is built for.
    """

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self._loaded: Any = None

    def state_dict(self) -> Any:
        return self._loaded if self._loaded is not None else self.obj.state_dict()

    def load_state_dict(self, state_dict: Any) -> None:
        self.obj.load_state_dict(state_dict)
        if not _has_tensor(state_dict):
            self._loaded = state_dict


def _has_tensor(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, dict):
        return any(_has_tensor(v) for v in x.values())
    return isinstance(x, (list, tuple)) and any(_has_tensor(v) for v in x)


def saved_entries(states: dict[str, Any], *, loading: bool = False) -> dict[str, Any]:
    """The state ckpt saves (or, ``loading``, restores): each stateful entry as its state dict;
    plain values as they are; ``None`` entries (no data loader) left out."""
    wrap = LoadedStateDictOf if loading else StateDictOf
    return {
        k: wrap(v) if hasattr(v, "state_dict") and hasattr(v, "load_state_dict") else v
        for k, v in states.items()
        if v is not None
    }


def export_model(model_state: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The model's state dict with its floating-point tensors in ``dtype`` (the last-step
    export); the others as they are."""
    return {
        k: v.detach().to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != dtype else v
        for k, v in model_state.items()
    }


def _top(path: str) -> str:
    return path.split("/", 1)[0]


def model_only_checkpoint(manifest: Manifest) -> bool:
    """Whether the checkpoint holds the model and nothing else (a seed or last-step save)."""
    tops = {_top(p) for p in manifest.arrays} | {_top(p) for p in manifest.values}
    return tops == {_MODEL}


def check_present(state: dict[str, Any], manifest: Manifest) -> None:
    """Raise :class:`StateMismatchError` naming every tensor or value ``state`` asks for that
    checkpoint ``manifest`` does not hold."""
    tree = {k: v.state_dict() if isinstance(v, (StateDictOf, LoadedStateDictOf)) else v for k, v in state.items()}
    missing = [
        path for path, _leaf, _is_tensor in flatten(tree) if path not in manifest.arrays and path not in manifest.values
    ]
    if not missing:
        return
    entries = sorted({_top(p) for p in missing})
    shown = "; ".join(missing[:20]) + (f" (and {len(missing) - 20} more)" if len(missing) > 20 else "")
    raise StateMismatchError(
        f"checkpoint step {manifest.step} lacks {len(missing)} tensor(s)/value(s) of entries {entries} that this "
        f"job loads: {shown}. Add entries the checkpoint does not hold to checkpoint.exclude_from_loading, or load "
        f"another step (checkpoint.load_step)",
        [f"{p!r}: missing from the checkpoint" for p in missing],
    )
