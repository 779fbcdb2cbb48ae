"""Recovery of a lost pipeline stage without rollback: CheckFree and CheckFree+.

Blagoev, Ersoy, Chen, "All is Not Lost: LLM Recovery without Checkpoints" (2025). A lost
interior stage ``i`` is rebuilt from its two live neighbours, layer by layer::

    W_i <- (a * W_{i+1} + b * W_{i-1}) / (a + b),   a = f(|g_{i+1}|) + eps,  b = f(|g_{i-1}|) + eps

where ``|g|`` is a neighbour's gradient norm of the last step and ``f`` is the identity (the
published code: norms taken after ``clip_grad_norm_``) or the square (one reading of the paper's
text); :class:`NeighborAverageConfig` picks. The rebuilt stage starts with a fresh optimizer and
a learning rate scaled by ``lr_scale``; every surviving stage keeps its live weights and
optimizer state. CheckFree+ covers the first and last stage: their (de)embedding layers are
replicated on the neighbouring stage, which (trained with swapped execution order on alternate
micro-batches) stands in for the lost stage's blocks, so the stage is restored by copy.

This module is pure policy and tensor arithmetic: no processes, no Ray, no I/O. A coordinator
calls :func:`plan_recovery` to learn what each lost stage needs, :class:`NeighborAverage` /
:func:`copy_from_neighbor` to build the new stage's state dict, :func:`prepare_rebuilt_optimizer`
in the new stage process, and :func:`decide_auto` to choose between ``reload`` and
``neighbor_average`` (with a reason to log).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .policy import ABORT, CONTINUED, RESTARTED, RecoveryOutcome, RecoveryPolicy

__all__ = [
    "AutoDecision",
    "AutoInputs",
    "AutoPolicy",
    "LossBumpTracker",
    "NeighborAverage",
    "NeighborAverageConfig",
    "NeighborAveragePolicy",
    "RecoveryAction",
    "StageRecovery",
    "StageRecoveryPolicy",
    "copy_from_neighbor",
    "decide_auto",
    "execution_order",
    "grad_norm",
    "plan_recovery",
    "prepare_rebuilt_optimizer",
    "stage_policy",
    "swap_partner",
]

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


# ---------------------------------------------------------------------------------------------
# What each lost stage needs


class RecoveryAction(str, enum.Enum):
    COPY_REPLICA = "copy_replica"  # a data-parallel replica of the stage survives: copy it
    NEIGHBOR_AVERAGE = "neighbor_average"  # interior stage, both neighbours alive
    COPY_NEIGHBOR = "copy_neighbor"  # first/last stage (CheckFree+): swap partner + (de)embedding replica
    RELOAD = "reload"  # no rule applies: roll everything back to a checkpoint


@dataclass(frozen=True, slots=True)
class StageRecovery:
    """How to rebuild one lost stage: the action, the stages to read from, and why."""

    stage: int
    action: RecoveryAction
    sources: tuple[int, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "action": self.action.value, "sources": list(self.sources), "reason": self.reason}


def swap_partner(stage: int, num_stages: int) -> int | None:
    """The stage that a first or last stage swaps execution order with in CheckFree+ (None if none)."""
    if num_stages < 2:
        return None
    if stage == 0:
        return 1
    if stage == num_stages - 1:
        return num_stages - 2
    return None


def plan_recovery(
    lost_replicas: Mapping[int, int],
    *,
    num_stages: int,
    replicas_per_stage: int = 1,
    edge_replicas: bool = True,
) -> list[StageRecovery]:
    """What each stage that lost replicas needs, in stage order.

    ``lost_replicas`` maps a stage to how many of its ``replicas_per_stage`` data-parallel
    replicas were lost. A stage with a surviving replica is copied from it. A stage whose
    replicas are all gone is rebuilt by neighbour averaging (interior), by copy from its swap
    partner and the (de)embedding replica (first/last, when ``edge_replicas``), or needs a
    reload: when a neighbour it would be rebuilt from is itself wholly lost, or with one stage.
    """
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if replicas_per_stage < 1:
        raise ValueError(f"replicas_per_stage must be >= 1, got {replicas_per_stage}")
    for s, n in lost_replicas.items():
        if not 0 <= s < num_stages:
            raise ValueError(f"stage {s} is not in 0..{num_stages - 1}")
        if not 0 <= n <= replicas_per_stage:
            raise ValueError(f"stage {s}: {n} replicas lost of {replicas_per_stage}")
    gone = {s for s, n in lost_replicas.items() if n == replicas_per_stage}
    plans: list[StageRecovery] = []
    for s in sorted(s for s, n in lost_replicas.items() if n > 0):
        if s not in gone:
            left = replicas_per_stage - lost_replicas[s]
            plans.append(StageRecovery(s, RecoveryAction.COPY_REPLICA, (s,), f"stage {s}: {left} data-parallel replica(s) survive; copy one"))
            continue
        partner = swap_partner(s, num_stages)
        if 0 < s < num_stages - 1:
            dead = [n for n in (s - 1, s + 1) if n in gone]
            if dead:
                plans.append(StageRecovery(s, RecoveryAction.RELOAD, (), f"stage {s} and its neighbour(s) {dead} are all lost; nothing to average"))
            else:
                plans.append(StageRecovery(s, RecoveryAction.NEIGHBOR_AVERAGE, (s - 1, s + 1), f"stage {s} lost; average stages {s - 1} and {s + 1}"))
        elif partner is None:
            plans.append(StageRecovery(s, RecoveryAction.RELOAD, (), f"stage {s} is the only stage; nothing to rebuild it from"))
        elif not edge_replicas:
            plans.append(StageRecovery(s, RecoveryAction.RELOAD, (), f"stage {s} is an edge stage and no neighbour holds a replica of its (de)embedding layers"))
        elif partner in gone:
            plans.append(StageRecovery(s, RecoveryAction.RELOAD, (), f"stage {s} and its swap partner {partner} are both lost"))
        else:
            plans.append(StageRecovery(s, RecoveryAction.COPY_NEIGHBOR, (partner,), f"edge stage {s} lost; copy swap partner {partner} and its replica of stage {s}'s edge layers"))
    return plans


# ---------------------------------------------------------------------------------------------
# Policy `auto`: reload or neighbour average, by cost


@dataclass(frozen=True, kw_only=True, slots=True)
class AutoInputs:
    """What ``auto`` weighs; times in seconds.

    Reload costs the steps done since the freshest snapshot (every stage redoes them) plus the
    restore. Neighbour averaging costs the steps the model needs to win back the loss bump the
    averaging causes (``recovery_steps`` when measured on earlier events, else
    ``expected_loss_bump / loss_slope_per_step``) plus the rebuild.
    """

    step_seconds: float
    steps_since_snapshot: int | None  # None: no snapshot to reload
    reload_seconds: float = 0.0
    rebuild_seconds: float = 0.0
    expected_loss_bump: float | None = None
    loss_slope_per_step: float | None = None  # recent loss decrease per step, > 0 while learning
    recovery_steps: float | None = None

    def __post_init__(self) -> None:
        if not (self.step_seconds > 0 and math.isfinite(self.step_seconds)):
            raise ValueError(f"step_seconds must be > 0, got {self.step_seconds!r}")
        if self.steps_since_snapshot is not None and self.steps_since_snapshot < 0:
            raise ValueError(f"steps_since_snapshot must be >= 0 or None, got {self.steps_since_snapshot}")
        for name in ("reload_seconds", "rebuild_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.recovery_steps is None and self.expected_loss_bump is None:
            raise ValueError("give recovery_steps or expected_loss_bump (with loss_slope_per_step)")
        if self.recovery_steps is not None and self.recovery_steps < 0:
            raise ValueError(f"recovery_steps must be >= 0, got {self.recovery_steps!r}")

    def averaging_steps(self) -> float:
        if self.recovery_steps is not None:
            return float(self.recovery_steps)
        bump = max(0.0, float(self.expected_loss_bump or 0.0))
        if bump == 0.0:
            return 0.0
        slope = self.loss_slope_per_step
        return bump / slope if slope is not None and slope > 0 else math.inf


@dataclass(frozen=True, slots=True)
class AutoDecision:
    """The policy ``auto`` chose, the cost estimates behind it, and a sentence for the event log."""

    policy: Literal["reload", "neighbor_average"]
    reason: str
    reload_cost_s: float
    average_cost_s: float
    plans: tuple[StageRecovery, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "reason": self.reason, "reload_cost_s": self.reload_cost_s,
            "average_cost_s": self.average_cost_s, "plans": [p.to_dict() for p in self.plans],
        }


def decide_auto(plans: Iterable[StageRecovery], inputs: AutoInputs) -> AutoDecision:
    """Choose ``reload`` or ``neighbor_average`` for one failure event, and say why.

    ``plans`` is :func:`plan_recovery`'s answer. A plan that needs a reload forces one; with no
    snapshot, rebuilding is the only choice; otherwise the cheaper estimate wins (ties go to
    reload, which loses no model quality). Stages copied from a surviving replica cost nothing
    either way and do not enter the comparison.
    """
    plans = tuple(plans)
    steps = inputs.steps_since_snapshot
    reload_cost = math.inf if steps is None else steps * inputs.step_seconds + inputs.reload_seconds
    avg_steps = inputs.averaging_steps()
    average_cost = avg_steps * inputs.step_seconds + inputs.rebuild_seconds
    rebuilt = [p for p in plans if p.action in (RecoveryAction.NEIGHBOR_AVERAGE, RecoveryAction.COPY_NEIGHBOR)]
    forced = [p for p in plans if p.action is RecoveryAction.RELOAD]
    redo = "no snapshot" if steps is None else f"redo {steps} step(s) since the freshest snapshot + {inputs.reload_seconds:.1f} s restore = {reload_cost:.1f} s"
    if inputs.recovery_steps is not None:
        bump = f"~{avg_steps:.0f} step(s) to recover from averaging (measured on earlier events)"
    else:
        slope = inputs.loss_slope_per_step
        bump = f"a loss bump of {inputs.expected_loss_bump or 0.0:.3f} at {slope if slope is not None else 0.0:.2g}/step = ~{avg_steps:.0f} step(s)"
    avg_text = f"{bump} + {inputs.rebuild_seconds:.1f} s rebuild = {average_cost:.1f} s"

    if forced:
        return AutoDecision("reload", f"reload: {forced[0].reason}", reload_cost, average_cost, plans)
    if not rebuilt:
        return AutoDecision("neighbor_average", "neighbor_average: every lost stage has a surviving data-parallel replica; copy it, nothing to roll back",
                            reload_cost, 0.0, plans)
    if steps is None:
        return AutoDecision("neighbor_average", f"neighbor_average: no snapshot to reload; rebuild costs {avg_text}", reload_cost, average_cost, plans)
    if average_cost < reload_cost:
        return AutoDecision("neighbor_average", f"neighbor_average: rebuilding costs {avg_text}; reloading would {redo}",
                            reload_cost, average_cost, plans)
    return AutoDecision("reload", f"reload: reloading would {redo}; rebuilding would cost {avg_text}", reload_cost, average_cost, plans)


class LossBumpTracker:
    """What averaging has cost so far: an average of the steps each past event took to recover.

    After a rebuild, call :meth:`start` with the loss before the failure, then :meth:`observe`
    with each step's loss: the event closes when the loss is back at the level before the
    failure (or after ``horizon`` steps). ``recovery_steps`` then feeds :class:`AutoInputs`.
    """

    def __init__(self, *, prior_steps: float = 50.0, alpha: float = 0.5, horizon: int = 1000) -> None:
        self.recovery_steps = float(prior_steps)
        self.alpha = alpha
        self.horizon = horizon
        self.events = 0
        self._target: float | None = None
        self._since = 0

    def start(self, loss_before: float) -> None:
        self._target, self._since = float(loss_before), 0

    def observe(self, loss: float) -> None:
        if self._target is None:
            return
        self._since += 1
        if loss <= self._target or self._since >= self.horizon:
            self.recovery_steps = (1 - self.alpha) * self.recovery_steps + self.alpha * self._since if self.events else float(self._since)
            self.events += 1
            self._target = None


# ---------------------------------------------------------------------------------------------
# CheckFree+ out-of-order execution


def execution_order(num_stages: int, micro_batch: int) -> list[int]:
    """The order stages run their blocks for ``micro_batch`` under CheckFree+.

    Even micro-batches run in order. Odd ones swap the first two and the last two stages'
    blocks (the embedding still runs first and the output layer last), so each edge stage's
    swap partner learns to stand in for it. With three stages the two swaps alternate.
    """
    order = list(range(num_stages))
    if micro_batch % 2 == 0 or num_stages < 2:
        return order
    if num_stages == 3:
        pair = (0, 1) if micro_batch % 4 == 1 else (1, 2)
        order[pair[0]], order[pair[1]] = order[pair[1]], order[pair[0]]
        return order
    order[0], order[1] = order[1], order[0]
    if num_stages >= 4:
        order[-1], order[-2] = order[-2], order[-1]
    return order


# ---------------------------------------------------------------------------------------------
# The policies: what the coordinator's ``policy=`` names resolve to


STRATEGIES = ("neighbor_average", "copy", "random", "reload", "auto")


class StageRecoveryPolicy(RecoveryPolicy):
    """Recover a pipeline-parallel job by replacing only the lost stages.

    ``strategy`` is how an interior stage comes back: ``neighbor_average`` (CheckFree), ``copy``
    (one neighbour), ``random`` (fresh init), ``reload`` (every stage back to the freshest
    snapshot) or ``auto`` (reload or neighbour average by :func:`decide_auto`). First and last
    stages are restored by copy (CheckFree+) by every strategy but ``reload``; a stage with a
    surviving data-parallel replica is copied from it.

    The job control must implement ``recover_stages(lost, policy)``
    (:class:`recovery.pipeline.RayPipeline` does); it asks :meth:`choose` what to do, does it,
    and logs the reason. A data-parallel job (``recovery.run``) has no stages to rebuild: such a
    job is refused when it starts.
    """

    requires_pipeline = True

    def __init__(self, strategy: str = "neighbor_average") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        self.name = strategy

    def choose(self, plans: Iterable[StageRecovery], inputs: AutoInputs | None = None) -> tuple[str, str]:
        """``(strategy, reason)`` for one failure event; ``reload`` whenever a plan needs one."""
        plans = tuple(plans)
        if self.strategy == "reload":
            return "reload", "policy reload: every stage goes back to the freshest snapshot"
        forced = [p.reason for p in plans if p.action is RecoveryAction.RELOAD]
        if forced:
            return "reload", f"reload: {'; '.join(forced)}"
        return self.strategy, f"{self.strategy}: " + "; ".join(f"stage {p.stage}: {p.reason}" for p in plans)

    def on_failure(self, failure: Any, job: Any) -> RecoveryOutcome:
        recover = getattr(job, "recover_stages", None)
        if recover is None:
            return RecoveryOutcome(ABORT, detail=f"policy {self.name!r} rebuilds pipeline stages; this job has none "
                                   "(use recovery.pipeline.RayPipeline, or policy='reload')")
        if not failure.ranks:
            return RecoveryOutcome(ABORT, detail=f"{failure.kind}: no stage named as lost ({failure.detail})")
        event = recover(sorted(failure.ranks), self)
        action = RESTARTED if event["chosen"] == "reload" else CONTINUED
        return RecoveryOutcome(action, detail=event.get("reason", ""))


class NeighborAveragePolicy(StageRecoveryPolicy):
    """``policy="neighbor_average"``: CheckFree for interior stages, CheckFree+ copy for the edges."""

    def __init__(self) -> None:
        super().__init__("neighbor_average")


class AutoPolicy(StageRecoveryPolicy):
    """``policy="auto"``: reload or neighbour average, whichever :func:`decide_auto` says is cheaper."""

    def __init__(self) -> None:
        super().__init__("auto")

    def choose(self, plans: Iterable[StageRecovery], inputs: AutoInputs | None = None) -> tuple[str, str]:
        if inputs is None:
            raise ValueError("policy auto needs AutoInputs (step time, steps since the snapshot, recovery steps)")
        decision = decide_auto(plans, inputs)
        return decision.policy, decision.reason


def stage_policy(policy: str | StageRecoveryPolicy) -> StageRecoveryPolicy:
    """A strategy name or a policy object -> the policy object."""
    if isinstance(policy, StageRecoveryPolicy):
        return policy
    if policy == "neighbor_average":
        return NeighborAveragePolicy()
    if policy == "auto":
        return AutoPolicy()
    return StageRecoveryPolicy(policy)
