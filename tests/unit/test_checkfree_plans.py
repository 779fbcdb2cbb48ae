"""CheckFree / CheckFree+ as a library, continued: the swapped execution order, the recovery
plans, ``auto``'s cost model, the stage policies, the loss-bump tracker and the routes."""

from __future__ import annotations

import itertools
import math

import pytest

from recovery import checkfree as cf


def test_execution_order_swaps_edge_pairs_on_odd_micro_batches():
    assert cf.execution_order(4, 0) == [0, 1, 2, 3]
    assert cf.execution_order(4, 1) == [1, 0, 3, 2]
    assert cf.execution_order(6, 3) == [1, 0, 2, 3, 5, 4]
    assert cf.execution_order(3, 1) == [1, 0, 2] and cf.execution_order(3, 3) == [0, 2, 1]
    assert cf.execution_order(2, 1) == [1, 0]
    assert cf.execution_order(1, 1) == [0]


# ---------------------------------------------------------------------------------------------
# Plans


def _actions(plans):
    return {p.stage: (p.action, p.sources) for p in plans}


def test_plan_interior_edge_and_replicas():
    A = cf.RecoveryAction
    plans = cf.plan_recovery({2: 1}, num_stages=5)
    assert _actions(plans) == {2: (A.NEIGHBOR_AVERAGE, (1, 3))}
    assert _actions(cf.plan_recovery({0: 1, 4: 1}, num_stages=5)) == {0: (A.COPY_NEIGHBOR, (1,)), 4: (A.COPY_NEIGHBOR, (3,))}
    # A surviving data-parallel replica is copied, whatever the stage.
    assert _actions(cf.plan_recovery({0: 1, 2: 1}, num_stages=5, replicas_per_stage=2)) == {
        0: (A.COPY_REPLICA, (0,)), 2: (A.COPY_REPLICA, (2,))}
    # Only when every replica is gone is the stage rebuilt; a partly lost neighbour still averages.
    assert _actions(cf.plan_recovery({2: 2, 3: 1}, num_stages=5, replicas_per_stage=2)) == {
        2: (A.NEIGHBOR_AVERAGE, (1, 3)), 3: (A.COPY_REPLICA, (3,))}
    assert all(p.reason for p in plans)


def test_plan_needs_reload_when_no_rule_applies():
    A = cf.RecoveryAction
    assert _actions(cf.plan_recovery({1: 1, 2: 1}, num_stages=4)) == {1: (A.RELOAD, ()), 2: (A.RELOAD, ())}
    assert _actions(cf.plan_recovery({0: 1, 1: 1}, num_stages=4))[0] == (A.RELOAD, ())
    assert _actions(cf.plan_recovery({0: 1}, num_stages=4, edge_replicas=False)) == {0: (A.RELOAD, ())}
    assert _actions(cf.plan_recovery({0: 1}, num_stages=1)) == {0: (A.RELOAD, ())}
    assert _actions(cf.plan_recovery({1: 1}, num_stages=2)) == {1: (A.COPY_NEIGHBOR, (0,))}
    with pytest.raises(ValueError):
        cf.plan_recovery({5: 1}, num_stages=4)
    with pytest.raises(ValueError):
        cf.plan_recovery({1: 3}, num_stages=4, replicas_per_stage=2)


# ---------------------------------------------------------------------------------------------
# Policy auto


def test_auto_prefers_averaging_when_many_steps_would_be_redone():
    plans = cf.plan_recovery({2: 1}, num_stages=4)
    d = cf.decide_auto(plans, cf.AutoInputs(step_seconds=1.0, steps_since_snapshot=400, reload_seconds=30,
                                            expected_loss_bump=0.2, loss_slope_per_step=0.002))
    assert d.policy == "neighbor_average"
    assert d.reload_cost_s == pytest.approx(430) and d.average_cost_s == pytest.approx(100)
    assert "400 step(s)" in d.reason and "100 step(s)" in d.reason
    assert d.to_dict()["plans"][0]["action"] == "neighbor_average"


def test_auto_prefers_reload_right_after_a_snapshot_or_on_a_plateau():
    plans = cf.plan_recovery({2: 1}, num_stages=4)
    fresh = cf.decide_auto(plans, cf.AutoInputs(step_seconds=1.0, steps_since_snapshot=5, reload_seconds=2, recovery_steps=60))
    assert fresh.policy == "reload" and "redo 5 step(s)" in fresh.reason
    plateau = cf.decide_auto(plans, cf.AutoInputs(step_seconds=1.0, steps_since_snapshot=300, expected_loss_bump=0.1,
                                                  loss_slope_per_step=0.0))
    assert plateau.policy == "reload" and math.isinf(plateau.average_cost_s)


def test_auto_forced_choices():
    forced = cf.decide_auto(cf.plan_recovery({1: 1, 2: 1}, num_stages=4),
                            cf.AutoInputs(step_seconds=1.0, steps_since_snapshot=1000, recovery_steps=1))
    assert forced.policy == "reload" and "nothing to average" in forced.reason
    nosnap = cf.decide_auto(cf.plan_recovery({1: 1}, num_stages=4),
                            cf.AutoInputs(step_seconds=1.0, steps_since_snapshot=None, recovery_steps=10_000))
    assert nosnap.policy == "neighbor_average" and "no snapshot" in nosnap.reason
    replica = cf.decide_auto(cf.plan_recovery({1: 1}, num_stages=4, replicas_per_stage=2),
                             cf.AutoInputs(step_seconds=1.0, steps_since_snapshot=0, recovery_steps=10))
    assert replica.policy == "neighbor_average" and "replica" in replica.reason
    with pytest.raises(ValueError, match="recovery_steps or expected_loss_bump"):
        cf.AutoInputs(step_seconds=1.0, steps_since_snapshot=3)


def test_loss_bump_tracker_measures_recovery_steps():
    t = cf.LossBumpTracker(prior_steps=50)
    assert t.recovery_steps == 50
    t.start(loss_before=2.0)
    for loss in (2.5, 2.3, 2.1, 1.99):
        t.observe(loss)
    assert t.events == 1 and t.recovery_steps == 4
    t.start(loss_before=2.0)
    for loss in (2.2, 1.9):
        t.observe(loss)
    assert t.recovery_steps == pytest.approx(3.0)
    t.observe(5.0)  # no event open: ignored
    assert t.events == 2


# --- the policies the coordinator's names resolve to ------------------------------------------


class _PipelineJob:
    """A job control with the pipeline verb; records what the policy asked for."""

    def __init__(self, chosen: str) -> None:
        self.calls: list[tuple[list[int], str]] = []
        self.chosen = chosen

    def recover_stages(self, lost, policy):
        self.calls.append((lost, policy.strategy))
        return {"chosen": self.chosen, "reason": f"{self.chosen}: because"}


def _failure(*ranks: int):
    from recovery.detect import WORKER_DIED, Failure

    return Failure(WORKER_DIED, 1, "stage lost", 0.0, ranks=ranks)


def test_policy_names_resolve_to_stage_policies():
    from recovery.policies import resolve_policy

    assert isinstance(resolve_policy("neighbor_average"), cf.NeighborAveragePolicy)
    assert isinstance(resolve_policy("auto"), cf.AutoPolicy)
    assert resolve_policy("neighbor_average").requires_pipeline
    assert not getattr(resolve_policy("reload"), "requires_pipeline", False)
    assert cf.stage_policy("copy").strategy == "copy"
    with pytest.raises(ValueError, match="strategy must be one of"):
        cf.StageRecoveryPolicy("average")


def test_neighbor_average_policy_chooses_per_plan():
    pol = cf.NeighborAveragePolicy()
    plans = cf.plan_recovery({2: 1}, num_stages=4)
    chosen, reason = pol.choose(plans)
    assert chosen == "neighbor_average" and "stage 2" in reason
    # Two neighbours lost: no rule applies, the policy falls back to reload and says why.
    chosen, reason = pol.choose(cf.plan_recovery({1: 1, 2: 1}, num_stages=4))
    assert chosen == "reload" and reason.startswith("reload:")
    assert cf.StageRecoveryPolicy("reload").choose(plans)[0] == "reload"
    assert cf.StageRecoveryPolicy("random").choose(plans)[0] == "random"


def test_auto_policy_uses_the_cost_model():
    pol = cf.AutoPolicy()
    plans = cf.plan_recovery({1: 1}, num_stages=4)
    many = cf.AutoInputs(step_seconds=1.0, steps_since_snapshot=500, recovery_steps=20)
    few = cf.AutoInputs(step_seconds=1.0, steps_since_snapshot=2, recovery_steps=20)
    assert pol.choose(plans, many)[0] == "neighbor_average"
    chosen, reason = pol.choose(plans, few)
    assert chosen == "reload" and "redo 2 step(s)" in reason
    with pytest.raises(ValueError, match="AutoInputs"):
        pol.choose(plans)


def test_stage_policy_on_failure_drives_the_pipeline_verb():
    from recovery.policy import ABORT, CONTINUED, RESTARTED

    job = _PipelineJob("neighbor_average")
    out = cf.NeighborAveragePolicy().on_failure(_failure(3, 1), job)
    assert job.calls == [([1, 3], "neighbor_average")] and out.action == CONTINUED
    assert cf.AutoPolicy().on_failure(_failure(2), _PipelineJob("reload")).action == RESTARTED
    # A job without stages, or a failure that names none: abort with a message, nothing done.
    out = cf.NeighborAveragePolicy().on_failure(_failure(1), object())
    assert out.action == ABORT and "policy='reload'" in out.detail
    assert cf.NeighborAveragePolicy().on_failure(_failure(), job).action == ABORT


def test_data_parallel_run_refuses_stage_policies():
    import recovery

    with pytest.raises(ValueError, match="data-parallel"):
        recovery.run(lambda ctx: None, num_workers=2, storage="memory://x", policy="neighbor_average")


def test_loss_bump_tracker_window_compares_mean_losses():
    t = cf.LossBumpTracker(prior_steps=10, window=3)
    for loss in (2.2, 2.0, 1.8):  # the level before the failure: their mean, 2.0
        t.observe(loss)
    t.start(loss_before=1.8)  # the last step's loss alone would be a lucky batch
    for loss in (2.6, 1.7, 1.9):  # means 2.6, 2.15, 2.067: not back yet
        t.observe(loss)
    assert t.events == 0
    t.observe(1.8)  # mean of the last three: 1.8
    assert t.events == 1 and t.recovery_steps == 4
    with pytest.raises(ValueError, match="window"):
        cf.LossBumpTracker(window=0)
    with pytest.raises(ValueError, match="loss_before"):
        cf.LossBumpTracker().start()


def test_the_tracker_learns_steps_per_unit_of_measured_bump():
    t = cf.LossBumpTracker(prior_steps=10, prior_steps_per_bump=40.0)
    assert t.steps_per_bump == 40.0 and not t.measured
    t.start(loss_before=2.0, bump=0.2)
    for loss in (2.3, 2.2, 2.1, 2.05, 1.99):  # 5 steps for a bump of 0.2
        t.observe(loss)
    assert t.measured == [(0.2, 5)]
    # the prior counts as one event of the mean bump: (40 x 0.2 + 5) / (0.2 + 0.2)
    assert t.steps_per_bump == pytest.approx(32.5)
    t.start(loss_before=2.0, bump=-0.05)  # the rebuild cost nothing measurable: counted as 0
    t.observe(1.9)
    assert t.measured[-1] == (0.0, 1) and t.steps_per_bump == pytest.approx((40 * 0.1 + 6) / (0.1 + 0.2))
    t.start(loss_before=2.0)  # no bump measured (a plain rebuild): steps only
    t.observe(1.9)
    assert len(t.measured) == 2 and t.events == 3
    free = cf.LossBumpTracker()  # no prior: nothing until measured, then the plain ratio
    assert free.steps_per_bump is None
    free.start(loss_before=2.0, bump=0.5)
    for loss in (2.4, 2.2, 1.9):
        free.observe(loss)
    assert free.steps_per_bump == pytest.approx(3 / 0.5)


def test_with_a_floor_the_tracker_fits_a_slope_a_small_bump_barely_moves():
    t = cf.LossBumpTracker(prior_steps_per_bump=19.0, steps_floor=3.5)
    assert t.steps_per_bump == 19.0
    t.start(loss_before=2.0, bump=0.3)
    for loss in (2.3, 2.2, 2.15, 2.1, 2.08, 2.05, 2.02, 2.01, 1.99):  # 9 steps: 3.5 + 0.3 x 18.3
        t.observe(loss)
    # least squares through the floor, the prior one event of the mean squared bump:
    # (19 x 0.09 + 0.3 x (9 - 3.5)) / (0.09 + 0.09)
    assert t.steps_per_bump == pytest.approx((19 * 0.09 + 0.3 * 5.5) / 0.18)
    before = t.steps_per_bump
    t.start(loss_before=2.0, bump=0.012)  # a tiny bump that took 10 steps (the loss's noise)
    for loss in (2.01,) * 9 + (1.99,):
        t.observe(loss)
    assert t.measured[-1] == (0.012, 10)
    assert abs(t.steps_per_bump - before) / before < 0.05  # the ratio of the sums: ~2.5x
    ratio = cf.LossBumpTracker(prior_steps_per_bump=19.0)
    ratio.measured = list(t.measured)
    assert ratio.steps_per_bump > 2 * before
    t.start(loss_before=2.0, bump=0.2)  # fewer steps than the floor: the slope may fall, never below 0
    t.observe(1.9)
    assert t.steps_per_bump >= 0
    with pytest.raises(ValueError, match="steps_floor"):
        cf.LossBumpTracker(steps_floor=-1.0)


def test_auto_weighs_the_bump_measured_after_rebuilding():
    plans = cf.plan_recovery({2: 1}, num_stages=4)
    big = cf.AutoInputs(step_seconds=1.0, steps_since_snapshot=8, recovery_steps=2, measured_bump=0.3,
                        steps_per_bump=40.0, steps_per_bump_measured=False)
    d = cf.decide_auto(plans, big)
    assert d.policy == "reload" and d.average_cost_s == pytest.approx(12.0)  # 0.3 x 40 > 8 to redo
    assert "a loss bump of +0.300 measured after rebuilding x ~40 step(s) per unit of bump (the prior" in d.reason
    small = cf.AutoInputs(step_seconds=1.0, steps_since_snapshot=8, recovery_steps=50, measured_bump=0.05,
                          steps_per_bump=40.0)
    d = cf.decide_auto(plans, small)  # 2 steps, though earlier events took 50 whatever their bump
    assert d.policy == "neighbor_average" and "measured on earlier events" in d.reason
    none = cf.AutoInputs(step_seconds=1.0, steps_since_snapshot=8, measured_bump=-0.1, steps_per_bump=40.0)
    assert none.averaging_steps() == 0.0
    with pytest.raises(ValueError, match="go together"):
        cf.AutoInputs(step_seconds=1.0, steps_since_snapshot=8, measured_bump=0.1)
    with pytest.raises(ValueError, match="steps_per_bump"):
        cf.AutoInputs(step_seconds=1.0, steps_since_snapshot=8, measured_bump=0.1, steps_per_bump=-1.0)


def test_auto_probes_only_where_both_choices_are_open():
    interior, edge = cf.plan_recovery({2: 1}, num_stages=4), cf.plan_recovery({0: 1}, num_stages=4)
    assert cf.worth_probing(interior, 5) and cf.worth_probing(edge, 5)
    assert not cf.worth_probing(interior, None)  # nothing to reload: rebuilding is the only choice
    assert not cf.worth_probing(interior, 0)  # right at the snapshot: reloading is free
    assert not cf.worth_probing(cf.plan_recovery({1: 1, 2: 1}, num_stages=4), 5)  # a reload is forced
    assert not cf.worth_probing(cf.plan_recovery({2: 1}, num_stages=4, replicas_per_stage=2), 5)  # a replica copies


# --- the real pipeline's schedule: routes, ranks, how a new stage gets its state ---------------


def test_routes_fixed_and_swapped():
    from recovery.pipeline.schedule import check_swap, rank_of, route, stage_of

    assert route(4, 1, swap=False) == [(0, ("embed", "blocks")), (1, ("blocks",)), (2, ("blocks",)),
                                       (3, ("blocks", "head"))]
    assert route(4, 0, swap=True) == route(4, 0, swap=False)
    # Odd micro-batches: the first stage embeds, its partner's blocks run before its own; the last
    # stage's blocks run before its partner's, and its output layer last.
    assert route(4, 1, swap=True) == [(0, ("embed",)), (1, ("blocks",)), (0, ("blocks",)), (3, ("blocks",)),
                                      (2, ("blocks",)), (3, ("head",))]
    for n in (2, 3, 4, 6):
        for m in range(4):
            hops = route(n, m, swap=True)
            blocks = [s for s, parts in hops if "blocks" in parts]
            assert blocks == cf.execution_order(n, m)  # the simulation's order, hop by hop
            assert hops[0][1][0] == "embed" and hops[0][0] == 0 and hops[-1] == (n - 1, hops[-1][1])
            assert hops[-1][1][-1] == "head"
            assert all(a[0] != b[0] for a, b in itertools.pairwise(hops))  # never a message to oneself
    assert route(1, 1, swap=True) == [(0, ("embed", "blocks", "head"))]
    with pytest.raises(ValueError, match="at least 4 micro-batches"):
        check_swap(3, 2)
    with pytest.raises(ValueError, match="at least 2 stages"):
        check_swap(1, 2)
    check_swap(4, 2)
    assert [rank_of(s, r, 3) for r in range(2) for s in range(3)] == list(range(6))
    assert stage_of(4, 3) == (1, 1)


def test_stage_init_and_pipeline_config_are_validated():
    from recovery.pipeline import PipelineConfig, StageInit

    assert StageInit("average", (1, 2), grad_norms=(0.5, 0.25)).sources == (1, 2)
    with pytest.raises(ValueError, match="needs 2 source"):
        StageInit("average", (1,))
    with pytest.raises(ValueError, match="how must be one of"):
        StageInit("clone", (1,))
    assert PipelineConfig(replicas=2, swap=True).replicas == 2
    for bad in ({"replicas": 0}, {"auto_prior_steps": -1.0}, {"auto_prior_steps_per_bump": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PipelineConfig(**bad)
