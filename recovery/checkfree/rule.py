"""The CheckFree rule: a lost interior stage's weights from its two neighbours' weights and
gradient norms, the copy that restores a first or last stage (CheckFree+), and the rebuilt
stage's fresh optimizer with a boosted learning rate. Tensor arithmetic only."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

StateDict = Mapping[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------
# The averaging rule


@dataclass(frozen=True, kw_only=True, slots=True)
class NeighborAverageConfig:
    """How a lost interior stage is rebuilt from its neighbours.

    ``norm``: ``"l2"`` weights each neighbour by its gradient norm (the published code),
    ``"l2_squared"`` by the norm squared. ``epsilon`` is added to each weight so that two zero
    norms give a plain mean. ``lr_scale`` multiplies the rebuilt stage's learning rate (1.1 in
    the paper, 1.2 for its largest model).
    """

    norm: Literal["l2", "l2_squared"] = "l2"
    epsilon: float = 1e-4
    lr_scale: float = 1.1

    def __post_init__(self) -> None:
        if self.norm not in ("l2", "l2_squared"):
            raise ValueError(f"norm must be 'l2' or 'l2_squared', got {self.norm!r}")
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon must be a positive finite number, got {self.epsilon!r}")
        if not (self.lr_scale > 0 and math.isfinite(self.lr_scale)):
            raise ValueError(f"lr_scale must be a positive finite number, got {self.lr_scale!r}")


class NeighborAverage:
    """The CheckFree rule: a lost stage's weights from its two neighbours' weights and grad norms."""

    def __init__(self, config: NeighborAverageConfig | None = None) -> None:
        self.config = config or NeighborAverageConfig()

    def weights(self, prev_grad_norm: float, next_grad_norm: float) -> tuple[float, float]:
        """``(w_prev, w_next)``, summing to 1: each neighbour weighted by its own gradient norm."""
        for name, v in (("prev_grad_norm", prev_grad_norm), ("next_grad_norm", next_grad_norm)):
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        power = 2 if self.config.norm == "l2_squared" else 1
        b = float(prev_grad_norm) ** power + self.config.epsilon
        a = float(next_grad_norm) ** power + self.config.epsilon
        return b / (a + b), a / (a + b)

    def rebuild(
        self,
        prev_state: StateDict,
        next_state: StateDict,
        *,
        prev_grad_norm: float,
        next_grad_norm: float,
        keys: Iterable[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The rebuilt stage's state dict (new tensors; the inputs are not modified).

        Entries are matched by name, so stages must name their layers locally (``blocks.0``
        in every stage, not a global layer index). ``keys`` are the entries the lost stage
        needs; by default every entry the two neighbours share (the first stage's embedding
        or the last stage's head, held by one neighbour only, are left out). Floating-point
        tensors are averaged in float32 and cast back; other tensors (integer buffers) are
        copied from the neighbour with the larger weight.
        """
        w_prev, w_next = self.weights(prev_grad_norm, next_grad_norm)
        wanted = _wanted_keys(keys, prev_state, next_state)
        out: dict[str, torch.Tensor] = {}
        for k in wanted:
            p, n = prev_state[k], next_state[k]
            if p.shape != n.shape or p.dtype != n.dtype:
                raise ValueError(
                    f"{k!r}: the neighbours disagree (shape {list(p.shape)} {p.dtype} vs {list(n.shape)} {n.dtype});"
                    " neighbour averaging needs stages of the same architecture"
                )
            if p.is_floating_point():
                avg = w_prev * p.detach().to(torch.float32) + w_next * n.detach().to(torch.float32)
                out[k] = avg.to(p.dtype)
            else:
                out[k] = (p if w_prev >= w_next else n).detach().clone()
        return out


def _wanted_keys(keys: Iterable[str] | None, *states: StateDict) -> list[str]:
    if keys is None:
        common = set(states[0]).intersection(*states[1:])
        return [k for k in states[0] if k in common]  # the first state's order
    wanted = list(keys)
    missing = sorted({k for k in wanted for s in states if k not in s})
    if missing:
        raise ValueError(f"entries the lost stage needs are missing from a neighbour: {missing[:10]}")
    return wanted


def copy_from_neighbor(
    neighbor_state: StateDict,
    *,
    edge_replica: StateDict | None = None,
    keys: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """A lost stage restored by copying one neighbour (CheckFree+ for the first and last stage).

    The neighbour's blocks (every entry of ``neighbor_state``, or only ``keys``) are copied;
    ``edge_replica`` holds the lost stage's own layers that the neighbour kept a replica of
    (the embedding of the first stage, the final norm and output layer of the last) and wins
    where names overlap. Also the "copy one neighbour" baseline for an interior stage.
    """
    replica = dict(edge_replica or {})
    if keys is None:
        names = [k for k in neighbor_state if k not in replica] + list(replica)
    else:
        names = list(keys)
        missing = sorted(k for k in names if k not in replica and k not in neighbor_state)
        if missing:
            raise ValueError(f"entries the lost stage needs are held neither by the neighbour nor its replica: {missing[:10]}")
    return {k: (replica[k] if k in replica else neighbor_state[k]).detach().clone() for k in names}


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """L2 norm of the gradients of ``parameters`` (a stage's, after clipping: what it reports)."""
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


# ---------------------------------------------------------------------------------------------
# The rebuilt stage's optimizer and learning rate

_BASE_LR = "checkfree_base_lr"  # a param group's learning rate before any rebuild, so boosts never compound


def restore_schedule_base(optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """After an optimizer's state was loaded from a checkpoint: the scheduler's base learning
    rates from the loaded groups, so that a stage rebuilt since that checkpoint (its base scaled
    by :func:`prepare_rebuilt_optimizer`) goes back to the checkpoint's schedule exactly, and one
    rebuilt before it keeps its boost. Set the schedule's step after this."""
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]


def prepare_rebuilt_optimizer(optimizer: torch.optim.Optimizer, scheduler: Any = None, *, lr_scale: float) -> None:
    """Give a rebuilt stage's optimizer fresh state and a learning rate ``lr_scale`` times its base.

    Moments and step counts are dropped (Adam restarts its bias correction). With a scheduler
    (any ``torch.optim.lr_scheduler`` that scales ``base_lrs``), the base learning rate is
    scaled so the boost lasts for the rest of the schedule, as in the paper; the current
    learning rate is scaled alike. Scaling is relative to the learning rate before the first
    rebuild, so a stage rebuilt twice is boosted once. Call it in the new stage process after
    building the optimizer (and scheduler, at the current step) the usual way.
    """
    if not (lr_scale > 0 and math.isfinite(lr_scale)):
        raise ValueError(f"lr_scale must be a positive finite number, got {lr_scale!r}")
    optimizer.state.clear()
    for i, group in enumerate(optimizer.param_groups):
        base = group.setdefault(_BASE_LR, group.get("initial_lr", group["lr"]))
        target = base * lr_scale
        if scheduler is not None and "initial_lr" in group:
            group["lr"] *= target / group["initial_lr"]  # keeps the schedule's current factor
            group["initial_lr"] = target
            scheduler.base_lrs[i] = target
        else:
            group["lr"] = target
    if scheduler is not None and hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
