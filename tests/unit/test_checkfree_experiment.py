"""The CheckFree experiment (``experiments/checkfree``) against the library: its ``auto`` runs the
library's policy, its reload checkpoints and rolls back as the real one, its calibration replays
the tracker, and its tables redraw from the runs kept in docs/."""

from __future__ import annotations

import torch

from examples.pipeline_demo import ModelConfig, TrainConfig
from recovery import checkfree as cf


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
    # after a tentative rebuild, with the bump it caused measured
    tracker = cf.LossBumpTracker(prior_steps=10, prior_steps_per_bump=44.0)
    chosen, reason = auto_choice(sim, [2], [1.0], took, 50, tracker, bump=0.3)  # ~13 steps to win back
    assert chosen == "reload" and "a loss bump of +0.300 measured after rebuilding" in reason
    assert auto_choice(sim, [2], [1.0], took, 50, tracker, bump=0.01)[0] == "average"  # ~0.4 step < 2 to redo


def test_the_experiments_reload_checkpoints_asynchronously_and_rolls_back_to_the_newest():
    """The experiment's checkpoints are a ``ckpt.Checkpointer``'s (the loop pays the copy, the
    write goes on beside it); a reload rolls back to the newest, the write under way included."""
    from examples.pipeline_demo import TextData
    from experiments.checkfree.sim import RunSpec, run

    cfg = ModelConfig(dim=16, heads=2, num_stages=4, blocks_per_stage=1, seq_len=8)
    spec = RunSpec(strategy="reload", rate="-", p_iter=0.05, seed=1, steps=12, swap=False, ckpt_every=4,
                   eval_every=6, eval_batches=1, final_eval_batches=1)
    data = TextData.from_stdlib(64 << 10)
    res, _ = run(spec, cfg, TrainConfig(total_steps=12, warmup_steps=1, batch_size=4, micro_batches=2), data)
    reloads = [e for e in res.events if e["how"] == "reload"]
    assert reloads and all(e["to_step"] == e["from_step"] // 4 * 4 for e in reloads)  # the newest, never older
    assert res.iterations == 12 + sum(e["from_step"] - e["to_step"] for e in reloads)  # the steps redone, no more
    assert len(res.save_times) >= 3  # a save every 4 steps, again after each rollback


def test_the_experiments_auto_reloads_after_a_tentative_rebuild_exactly_as_a_plain_reload(tmp_path):
    """auto rebuilds first and measures; a reload after that leaves every stage, its optimizer
    state and its learning rate exactly as a reload without the rebuild (the rebuilt stage's
    boosted schedule included)."""
    import copy

    from examples.pipeline_demo import TextData
    from experiments.checkfree.sim import RunSpec, SimPipeline

    cfg = ModelConfig(dim=16, heads=2, num_stages=4, blocks_per_stage=1, seq_len=8)
    tcfg = TrainConfig(total_steps=12, warmup_steps=1, batch_size=4, micro_batches=2)
    data = TextData.from_stdlib(64 << 10)
    sim = SimPipeline(cfg, tcfg, RunSpec(strategy="auto", rate="-", p_iter=0.0, seed=0, steps=12, swap=False))
    for _ in range(4):
        sim.train_step(data)
    sim.save(str(tmp_path / "run"))
    sim.close()  # (committed)
    for _ in range(3):
        sim.train_step(data)
    plain, probed = copy.deepcopy(sim), sim
    probed.rebuild([2])
    assert probed.probe_loss(data) != plain.probe_loss(data)  # the rebuild changed the model
    assert plain.reload(str(tmp_path / "run")) == probed.reload(str(tmp_path / "run")) == 4
    for a, b in zip(plain.state()["model"].values(), probed.state()["model"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for (oa, _), (ob, _) in zip(plain.opts, probed.opts):
        assert [g["lr"] for g in oa.param_groups] == [g["lr"] for g in ob.param_groups]
    assert plain.train_step(data) == probed.train_step(data)  # and they train on alike


def test_the_calibration_replays_the_tracker_over_the_averaging_runs():
    from experiments.checkfree.calibrate import pairs

    losses = [3.0, 2.9, 2.8, 2.7, 2.6, 3.1, 2.9, 2.6, 2.5, 2.4, 2.3]  # a rebuild before the 6th step
    run = {"spec": {"rate": "16%/h", "strategy": "average", "swap": False, "seed": 2},
           "train": [(i + 1, i + 1, x) for i, x in enumerate(losses)],
           "events": [{"iteration": 5, "probe_bump": 0.4}]}
    other = dict(run, spec=dict(run["spec"], strategy="reload"))
    swapped = dict(run, spec=dict(run["spec"], swap=True))
    got = pairs([run, other, swapped], range(6))
    # the level before: the mean of the 5 losses before, 2.8; the means since: 3.1, 3.0, 2.87, 2.78
    assert got == [{"seed": 2, "rate": "16%/h", "iteration": 5, "bump": 0.4, "steps": 4}]
    assert pairs([run], range(3, 6)) == []


def test_the_experiments_tables_redraw_from_the_runs_kept_one_auto_model_at_a_time(tmp_path, capsys, monkeypatch):
    """docs/checkfree.md's tables on seeds 18-29 redraw from the runs kept in docs/, without
    training: the ratio's auto by default, the floor's with --auto-steps-floor."""
    from pathlib import Path

    from experiments.checkfree import run

    monkeypatch.setattr(run, "plot", lambda *a: None)  # (matplotlib: not a test dependency)
    docs = Path(__file__).resolve().parents[2] / "docs"
    files = [str(docs / "checkfree_runs_fresh_18_29.jsonl"), str(docs / "checkfree_runs_auto_floor.jsonl")]
    rows = {}
    for floor in ([], ["--auto-steps-floor", "3.55"]):
        assert run.main(["--from-results", *files, *floor, "--out", str(tmp_path / str(len(floor)))]) == 0
        out = capsys.readouterr().out
        table = out[out.index("| rate | auto, s to target"):]
        rows[bool(floor)] = [line.split(" | ")[4] for line in table.splitlines()[2:5]]
    assert rows[False] == ["-0.0% (neighbour average)", "-0.4% (neighbour average)", "-2.7% (neighbour average)"]
    assert rows[True] == ["+0.2% (neighbour average)", "+0.6% (neighbour average)", "-0.3% (neighbour average)"]
