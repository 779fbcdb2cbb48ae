"""What each lost stage needs (:func:`plan_recovery`), the cost model of policy ``auto``
(:func:`decide_auto`) and what averaging has cost so far (:class:`LossBumpTracker`), and
CheckFree+'s swapped execution order. Pure logic: no tensors, no processes."""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

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
    averaging causes, plus the rebuild. Those steps, the first of these given:

    - ``measured_bump x steps_per_bump``: the bump measured after a tentative rebuild (the last
      step's batch through the rebuilt pipeline against the loss that step recorded), times the
      steps a unit of bump took to win back on earlier events (:class:`LossBumpTracker`), or its
      prior (``steps_per_bump_measured`` False);
    - ``recovery_steps``: the steps earlier events took, whatever their bump, or a prior;
    - ``expected_loss_bump / loss_slope_per_step``.
    """

    step_seconds: float
    steps_since_snapshot: int | None  # None: no snapshot to reload
    reload_seconds: float = 0.0
    rebuild_seconds: float = 0.0
    expected_loss_bump: float | None = None
    loss_slope_per_step: float | None = None  # recent loss decrease per step, > 0 while learning
    recovery_steps: float | None = None
    recovery_steps_measured: bool = True  # False: recovery_steps is a prior, no event measured yet
    measured_bump: float | None = None  # the loss bump measured after a tentative rebuild
    steps_per_bump: float | None = None  # steps to win back a unit of bump
    steps_per_bump_measured: bool = True  # False: steps_per_bump is a prior, no event measured yet

    def __post_init__(self) -> None:
        if not (self.step_seconds > 0 and math.isfinite(self.step_seconds)):
            raise ValueError(f"step_seconds must be > 0, got {self.step_seconds!r}")
        if self.steps_since_snapshot is not None and self.steps_since_snapshot < 0:
            raise ValueError(f"steps_since_snapshot must be >= 0 or None, got {self.steps_since_snapshot}")
        for name in ("reload_seconds", "rebuild_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if (self.measured_bump is None) != (self.steps_per_bump is None):
            raise ValueError("measured_bump and steps_per_bump go together")
        if self.steps_per_bump is not None and not (self.steps_per_bump >= 0 and math.isfinite(self.steps_per_bump)):
            raise ValueError(f"steps_per_bump must be a finite number >= 0, got {self.steps_per_bump!r}")
        if self.recovery_steps is None and self.expected_loss_bump is None and self.measured_bump is None:
            raise ValueError("give measured_bump (with steps_per_bump), recovery_steps or expected_loss_bump "
                             "(with loss_slope_per_step)")
        if self.recovery_steps is not None and self.recovery_steps < 0:
            raise ValueError(f"recovery_steps must be >= 0, got {self.recovery_steps!r}")

    def averaging_steps(self) -> float:
        if self.measured_bump is not None and self.steps_per_bump is not None:
            return max(0.0, float(self.measured_bump)) * self.steps_per_bump
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
    if inputs.measured_bump is not None:
        source = "measured on earlier events" if inputs.steps_per_bump_measured else "the prior: none measured yet"
        bump = (f"a loss bump of {inputs.measured_bump:+.3f} measured after rebuilding x ~{inputs.steps_per_bump:.0f} "
                f"step(s) per unit of bump ({source}) = ~{avg_steps:.0f} step(s) to win it back")
    elif inputs.recovery_steps is not None:
        source = "measured on earlier events" if inputs.recovery_steps_measured else "the prior: none measured yet"
        bump = f"~{avg_steps:.0f} step(s) to recover from averaging ({source})"
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


def worth_probing(plans: Iterable[StageRecovery], steps_since_snapshot: int | None) -> bool:
    """Whether policy ``auto`` rebuilds first and measures the bump before it chooses: a stage is
    rebuilt from its neighbours, no plan forces a reload, and there is a snapshot a few steps
    back to reload instead (none: rebuilding is the only choice; right at it: reloading is free)."""
    plans = tuple(plans)
    return (steps_since_snapshot is not None and steps_since_snapshot > 0
            and not any(p.action is RecoveryAction.RELOAD for p in plans)
            and any(p.action in (RecoveryAction.NEIGHBOR_AVERAGE, RecoveryAction.COPY_NEIGHBOR) for p in plans))


class LossBumpTracker:
    """What averaging has cost so far: an average of the steps each past event took to recover,
    and the steps per unit of the bump measured right after the rebuild.

    After a rebuild, call :meth:`start` with the loss before the failure (and the ``bump``
    measured, if one was), then :meth:`observe` with each step's loss: the event closes when the
    loss is back at the level before the failure (or after ``horizon`` steps).
    ``recovery_steps`` and :attr:`steps_per_bump` then feed :class:`AutoInputs`.

    The bump predicts the steps an event takes far better than the events before it do (on
    the CheckFree experiment's runs, docs/checkfree.md). ``steps_per_bump`` is the ratio of the
    sums over the events measured (a large bump counts for more than a small one, whose ratio is
    mostly noise), the prior ``prior_steps_per_bump`` counting as one event of their mean bump.

    With ``steps_floor`` set, the steps are modelled as ``steps_floor + slope x bump`` instead
    (the floor: the steps any event is measured to take, the loss being noisy, whatever its bump;
    it is spent after a reload as much) and ``steps_per_bump`` is the slope, fitted by least
    squares through the floor (an event weighs its bump squared: a small bump's steps, mostly
    the floor's noise, barely move it; the prior counts as one event of their mean squared bump).

    One step's loss is noisy (each step sees another batch); with ``window`` > 1 the level
    before the failure is the mean of the last ``window`` losses observed before :meth:`start`
    (``loss_before`` is then only used when none were), and the level after is the mean of the
    losses since the rebuild, the last ``window`` of them.
    """

    def __init__(self, *, prior_steps: float = 50.0, alpha: float = 0.5, horizon: int = 1000, window: int = 1,
                 prior_steps_per_bump: float | None = None, steps_floor: float | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if steps_floor is not None and not (steps_floor >= 0 and math.isfinite(steps_floor)):
            raise ValueError(f"steps_floor must be None or a finite number >= 0, got {steps_floor!r}")
        self.prior_steps_per_bump = prior_steps_per_bump
        self.steps_floor = steps_floor
        self.measured: list[tuple[float, int]] = []  # (bump measured at the rebuild, steps it took)
        self._bump: float | None = None
        self.recovery_steps = float(prior_steps)
        self.alpha = alpha
        self.horizon = horizon
        self.window = window
        self.events = 0
        self._target: float | None = None
        self._since = 0
        self._recent: deque[float] = deque(maxlen=window)
        self._after: deque[float] = deque(maxlen=window)

    @property
    def steps_per_bump(self) -> float | None:
        """Steps to win back a unit of measured bump (None: no prior and nothing measured)."""
        prior = self.prior_steps_per_bump
        if not self.measured:
            return prior
        if self.steps_floor is not None:
            squares = sum(b * b for b, _ in self.measured)
            weight = squares / len(self.measured) if prior is not None else 0.0
            if squares + weight <= 0:
                return prior
            above = sum(b * (n - self.steps_floor) for b, n in self.measured)
            return max(0.0, ((prior or 0.0) * weight + above) / (weight + squares))
        bumps, steps = sum(b for b, _ in self.measured), sum(n for _, n in self.measured)
        weight = bumps / len(self.measured) if prior is not None else 0.0
        if bumps + weight <= 0:
            return prior
        return ((prior or 0.0) * weight + steps) / (weight + bumps)

    def start(self, loss_before: float | None = None, *, bump: float | None = None) -> None:
        if self.window > 1 and self._recent:
            target = sum(self._recent) / len(self._recent)
        elif loss_before is None:
            raise ValueError("LossBumpTracker.start needs loss_before when no loss was observed yet")
        else:
            target = float(loss_before)
        self._target, self._since, self._bump = target, 0, bump
        self._after.clear()

    def observe(self, loss: float) -> None:
        self._recent.append(float(loss))
        if self._target is None:
            return
        self._since += 1
        self._after.append(float(loss))
        if sum(self._after) / len(self._after) <= self._target or self._since >= self.horizon:
            self.recovery_steps = (1 - self.alpha) * self.recovery_steps + self.alpha * self._since if self.events else float(self._since)
            self.events += 1
            if self._bump is not None:
                self.measured.append((max(0.0, self._bump), self._since))
            self._target = self._bump = None


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
