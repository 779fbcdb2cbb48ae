"""CheckFree / CheckFree+ as a library: the averaging rule, the rebuilt stage's optimizer, the plans, ``auto``."""

from __future__ import annotations

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


def test_a_reload_after_a_rebuild_goes_back_to_the_checkpoints_schedule():
    import copy

    from examples.pipeline_demo import set_schedule_step

    _, opt, sched, tcfg = _trained_optimizer(10)
    before = copy.deepcopy(opt.state_dict())  # a checkpoint taken before the rebuild
    cf.prepare_rebuilt_optimizer(opt, sched, lr_scale=1.1)
    after = copy.deepcopy(opt.state_dict())  # and one after it
    opt.load_state_dict(before)
    set_schedule_step(sched, 12)  # (the scheduler alone keeps the boost it was given)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.1 * tcfg.lr * lr_factor(12, tcfg))
    cf.restore_schedule_base(opt, sched)
    set_schedule_step(sched, 12)
    assert all(g["lr"] == pytest.approx(tcfg.lr * lr_factor(12, tcfg)) for g in opt.param_groups)
    opt.load_state_dict(after)
    cf.restore_schedule_base(opt, sched)
    set_schedule_step(sched, 12)  # a checkpoint taken after the rebuild keeps its boost
    assert all(g["lr"] == pytest.approx(1.1 * tcfg.lr * lr_factor(12, tcfg)) for g in opt.param_groups)


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
