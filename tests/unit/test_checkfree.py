"""CheckFree / CheckFree+ as a library: the averaging rule, the rebuilt stage's optimizer, the plans, ``auto``."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from examples.pipeline_demo import ModelConfig, Stage, TrainConfig, build_optimizer, build_stages, lr_factor
from recovery import checkfree as cf

EPS = 1e-4


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.w": torch.randn(4, 3, generator=g),
        "blocks.0.b": torch.randn(3, generator=g),
        "blocks.1.h": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        "counter": torch.tensor([seed, seed + 1]),
    }


# ---------------------------------------------------------------------------------------------
# The averaging rule


def test_weights_follow_the_neighbours_grad_norms_unsquared_by_default():
    rule = cf.NeighborAverage()
    w_prev, w_next = rule.weights(2.0, 1.0)
    # W_i = (a W_{i+1} + b W_{i-1}) / (a + b), a = |g_{i+1}| + eps, b = |g_{i-1}| + eps
    assert w_prev == pytest.approx((2.0 + EPS) / (3.0 + 2 * EPS))
    assert w_next == pytest.approx((1.0 + EPS) / (3.0 + 2 * EPS))
    assert w_prev + w_next == pytest.approx(1.0)


def test_squared_norms():
    rule = cf.NeighborAverage(cf.NeighborAverageConfig(norm="l2_squared"))
    w_prev, w_next = rule.weights(2.0, 1.0)
    assert w_prev == pytest.approx((4.0 + EPS) / (5.0 + 2 * EPS))
    assert w_next == pytest.approx((1.0 + EPS) / (5.0 + 2 * EPS))


def test_zero_norms_give_the_plain_mean_and_clipped_norms_too():
    assert cf.NeighborAverage().weights(0.0, 0.0) == pytest.approx((0.5, 0.5))
    # After clip_grad_norm_(1.0) both norms are often exactly 1: the rule becomes a plain mean.
    assert cf.NeighborAverage().weights(1.0, 1.0) == pytest.approx((0.5, 0.5))


def test_rebuild_is_the_weighted_average_layer_by_layer():
    prev, nxt = _state(1), _state(2)
    keep_prev = {k: v.clone() for k, v in prev.items()}
    keep_next = {k: v.clone() for k, v in nxt.items()}
    out = cf.NeighborAverage().rebuild(prev, nxt, prev_grad_norm=0.3, next_grad_norm=0.9)
    b, a = 0.3 + EPS, 0.9 + EPS
    for k in ("blocks.0.w", "blocks.0.b"):
        assert torch.allclose(out[k], (a * nxt[k] + b * prev[k]) / (a + b), atol=1e-6, rtol=0)
    expect = ((a * nxt["blocks.1.h"].float() + b * prev["blocks.1.h"].float()) / (a + b)).to(torch.bfloat16)
    assert out["blocks.1.h"].dtype == torch.bfloat16 and torch.equal(out["blocks.1.h"], expect)
    # Non-float entries: copied from the heavier neighbour (next, here).
    assert torch.equal(out["counter"], nxt["counter"])
    # Inputs untouched, outputs are new tensors.
    for k in prev:
        assert torch.equal(prev[k], keep_prev[k]) and torch.equal(nxt[k], keep_next[k])
        assert out[k].data_ptr() not in (prev[k].data_ptr(), nxt[k].data_ptr())


def test_rebuild_keeps_entries_both_neighbours_have_and_checks_the_ones_asked_for():
    prev = {"embed.weight": torch.ones(5, 3), **_state(1)}  # the first stage has the embedding too
    nxt = _state(2)
    out = cf.NeighborAverage().rebuild(prev, nxt, prev_grad_norm=1, next_grad_norm=1)
    assert set(out) == set(nxt)
    with pytest.raises(ValueError, match="embed.weight"):
        cf.NeighborAverage().rebuild(prev, nxt, prev_grad_norm=1, next_grad_norm=1, keys=["embed.weight"])
    bad = dict(nxt, **{"blocks.0.w": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="same architecture"):
        cf.NeighborAverage().rebuild(prev, bad, prev_grad_norm=1, next_grad_norm=1)


@pytest.mark.parametrize("kwargs", [{"norm": "l1"}, {"epsilon": 0.0}, {"lr_scale": -1.0}, {"lr_scale": math.inf}])
def test_config_is_validated(kwargs):
    with pytest.raises(ValueError):
        cf.NeighborAverageConfig(**kwargs)


def test_negative_or_nan_norms_are_rejected():
    with pytest.raises(ValueError, match="prev_grad_norm"):
        cf.NeighborAverage().weights(-1.0, 1.0)
    with pytest.raises(ValueError, match="next_grad_norm"):
        cf.NeighborAverage().weights(1.0, math.nan)


def test_rebuilt_state_loads_into_a_real_interior_stage():
    cfg = ModelConfig(dim=16, heads=2, num_stages=4, blocks_per_stage=2, seq_len=8)
    stages = build_stages(cfg, seed=3)
    sd = cf.NeighborAverage().rebuild(stages[0].state_dict(), stages[2].state_dict(), prev_grad_norm=0.5, next_grad_norm=0.2)
    fresh = Stage(cfg, 1, seed=99)
    fresh.load_state_dict(sd)  # strict: every entry of an interior stage, nothing else
    w = (0.5 + EPS) / (0.7 + 2 * EPS)
    expect = w * stages[0].blocks[1].qkv.weight + (1 - w) * stages[2].blocks[1].qkv.weight
    assert torch.allclose(fresh.blocks[1].qkv.weight, expect, atol=1e-6, rtol=0)


def test_grad_norm():
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(1))
    p.grad, q.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert cf.grad_norm([p, q]) == pytest.approx(5.0)
    assert cf.grad_norm([torch.nn.Parameter(torch.zeros(1))]) == 0.0


# ---------------------------------------------------------------------------------------------
# The rebuilt stage's optimizer and learning rate


def _trained_optimizer(step: int):
    cfg = ModelConfig(dim=16, heads=2, num_stages=3, blocks_per_stage=1, seq_len=8)
    tcfg = TrainConfig(lr=1e-2, warmup_steps=4, total_steps=40)
    stage = Stage(cfg, 1)
    opt, sched = build_optimizer(stage, tcfg)
    for _ in range(step):
        stage(torch.randn(2, 8, 16)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return stage, opt, sched, tcfg


def test_rebuilt_optimizer_has_fresh_state_and_a_boosted_lr_that_lasts_through_the_schedule():
    stage, opt, sched, tcfg = _trained_optimizer(10)
    assert opt.state  # moments and step counts exist
    cf.prepare_rebuilt_optimizer(opt, sched, lr_scale=1.1)
    assert not opt.state
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1.1 * tcfg.lr * lr_factor(10, tcfg))
    # Train on: Adam starts from step 1 again, and the boost stays under the schedule.
    stage(torch.randn(2, 8, 16)).pow(2).mean().backward()
    opt.step()
    sched.step()
    assert all(float(s["step"]) == 1.0 for s in opt.state.values())
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1.1 * tcfg.lr * lr_factor(11, tcfg))
    # A second rebuild of the same stage is boosted once, not twice.
    cf.prepare_rebuilt_optimizer(opt, sched, lr_scale=1.1)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1.1 * tcfg.lr * lr_factor(11, tcfg))


def test_rebuilt_optimizer_without_scheduler():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.5)
    p.grad = torch.ones(3)
    opt.step()
    cf.prepare_rebuilt_optimizer(opt, lr_scale=1.2)
    assert not opt.state and opt.param_groups[0]["lr"] == pytest.approx(0.6)
    cf.prepare_rebuilt_optimizer(opt, lr_scale=1.2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="lr_scale"):
        cf.prepare_rebuilt_optimizer(opt, lr_scale=0)


def test_survivors_optimizer_is_not_touched_by_a_rebuild():
    _, opt, sched, _ = _trained_optimizer(3)
    before = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()}
    lrs = [g["lr"] for g in opt.param_groups]
    rebuilt_stage, rebuilt_opt, rebuilt_sched, _ = _trained_optimizer(3)
    cf.prepare_rebuilt_optimizer(rebuilt_opt, rebuilt_sched, lr_scale=1.1)
    assert [g["lr"] for g in opt.param_groups] == lrs
    for k, v in opt.state.items():
        for n, t in v.items():
            assert torch.equal(t, before[k][n])


# ---------------------------------------------------------------------------------------------
# CheckFree+: first and last stage by copy


def test_first_and_last_stage_are_restored_by_copy_of_their_swap_partner_and_replica():
    cfg = ModelConfig(dim=16, heads=2, num_stages=4, blocks_per_stage=2, seq_len=8)
    stages = build_stages(cfg, seed=1)
    for lost, partner in ((0, 1), (3, 2)):
        replica = stages[lost].edge_layers()  # what the partner held
        assert replica and not any(k.startswith("blocks.") for k in replica)
        sd = cf.copy_from_neighbor(stages[partner].state_dict(), edge_replica=replica, keys=stages[lost].state_dict().keys())
        fresh = Stage(cfg, lost, seed=42)
        fresh.load_state_dict(sd)
        for k, v in fresh.state_dict().items():
            src = replica[k] if k in replica else stages[partner].state_dict()[k]
            assert torch.equal(v, src), k
    with pytest.raises(ValueError, match="neither"):
        cf.copy_from_neighbor(stages[1].state_dict(), keys=["embed.weight"])


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
    for bad in ({"replicas": 0}, {"auto_prior_steps": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PipelineConfig(**bad)


def test_the_experiments_auto_is_the_librarys_policy():
    """The experiment's ``auto`` runs decide_auto on what its run measured: reload right after a
    checkpoint, rebuild when many steps would be redone, and the reason is the policy's."""
    from experiments.checkfree.sim import RunSpec, SimPipeline, auto_choice

    cfg = ModelConfig(dim=16, heads=2, num_stages=4, blocks_per_stage=1, seq_len=8)
    sim = SimPipeline(cfg, TrainConfig(total_steps=10, warmup_steps=1), RunSpec(strategy="auto", rate="-", p_iter=0.0,
                                                                                seed=0, steps=10, swap=False))
    tracker = cf.LossBumpTracker(prior_steps=10)
    took = {"reload": [], "average": []}
    sim.step = 52
    assert auto_choice(sim, [2], [1.0], took, 50, tracker)[0] == "reload"  # 2 steps to redo < 10 to win back
    chosen, reason = auto_choice(sim, [2], [1.0], took, 20, tracker)  # 32 steps to redo
    assert chosen == "average" and reason.startswith("neighbor_average:") and "redo 32 step(s)" in reason
    assert "the prior: none measured yet" in reason
    assert auto_choice(sim, [2], [1.0], took, None, tracker)[0] == "average"  # nothing to reload
    assert auto_choice(sim, [1, 2], [1.0], took, None, tracker)[0] == "reload"  # no rule applies
