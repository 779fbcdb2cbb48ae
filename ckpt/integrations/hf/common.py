"""What the Trainer callback and the Accelerate wrapper share: the RNG kept for later, and the
torch objects behind Accelerate's wrappers."""

from __future__ import annotations

from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn

from ...stateful import OptimizerState, RNGState


class DeferredRNG:
    """The process's random generators in a checkpoint, restored when the loop says so.

    Saving reads the generators at once, like :class:`ckpt.RNGState`. Loading only keeps the
    state: :meth:`apply` sets the generators later, at the one point of the resumed loop where
    the uninterrupted loop read them (after the data loader's iterator drew its seed, before the
    first forward), so that dropout draws the same numbers as in a run that never stopped.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return RNGState().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    @property
    def pending(self) -> dict[str, Any] | None:
        """The loaded state not applied yet, or None."""
        return self._pending

    def apply(self) -> bool:
        """Set the generators to the loaded state, once; False when nothing is pending."""
        if self._pending is None:
            return False
        RNGState().load_state_dict(self._pending)
        self._pending = None
        return True


def torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer behind Accelerate's wrapper: the one whose step hooks fire and whose
    state the checkpoint keys by parameter name."""
    if isinstance(optimizer, AcceleratedOptimizer):
        return optimizer.optimizer
    return optimizer


def grad_scaler(optimizer: torch.optim.Optimizer) -> Any:
    """The ``GradScaler`` Accelerate keeps with an optimizer (fp16 training), or None."""
    if isinstance(optimizer, AcceleratedOptimizer):
        return optimizer.scaler
    return None


def pair_optimizer(models: list[nn.Module], optimizer: torch.optim.Optimizer) -> OptimizerState:
    """The optimizer with the one model whose parameters it updates, so that its state is keyed
    by parameter name."""
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    owners = [m for m in models if params & {id(p) for p in m.parameters()}]
    if len(owners) != 1:
        raise ValueError(
            f"an optimizer updates parameters of {len(owners)} of the {len(models)} models; ckpt keys "
            "optimizer state by parameter name and needs exactly one: pass state= explicitly, with "
            "ckpt.OptimizerState(model, optimizer) per optimizer"
        )
    return OptimizerState(owners[0], optimizer)
