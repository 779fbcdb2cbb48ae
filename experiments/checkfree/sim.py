"""One training run of the CheckFree comparison, with the pipeline simulated in one process.

The model is the pipeline demo's (``examples.pipeline_demo.Stage``), cut into the same stages, each
with its own optimizer and schedule as it would have in its own process. A failure of stage
``s`` throws that stage's weights and optimizer state away and rebuilds them with the run's
strategy; the other stages are untouched (or, for ``reload``, all roll back to the checkpoint).
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import ckpt
from examples.pipeline_demo import (
    ModelConfig,
    Stage,
    TextData,
    TrainConfig,
    build_optimizer,
    build_stages,
    set_schedule_step,
)
from recovery import checkfree as cf

from .report import STRATEGIES

AUTO_PRIOR_STEPS = 10.0  # policy auto's steps to win back an averaging bump before one is measured (PipelineConfig's default)
AUTO_PRIOR_STEPS_PER_BUMP = 44.0  # policy auto: steps per unit of measured bump before one is measured (PipelineConfig's default)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSpec:
    strategy: str
    rate: str  # "5%/h", ...
    p_iter: float  # per-stage failure probability per iteration
    seed: int
    steps: int
    swap: bool  # CheckFree+ out-of-order micro-batches
    real: bool = False  # run on recovery.pipeline.RayPipeline (one process per stage), not in one process
    ckpt_every: int = 50
    lr_scale: float = 1.1
    eval_every: int = 25
    eval_batches: int = 4
    final_eval_batches: int = 16
    # policy auto's model of the steps a rebuild takes (recovery.checkfree.LossBumpTracker): None, the
    # ratio of the sums; a number, a floor plus a slope fitted through it (with its prior slope)
    auto_steps_floor: float | None = None
    auto_prior_steps_per_bump: float = AUTO_PRIOR_STEPS_PER_BUMP

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")


@dataclass
class RunResult:
    spec: dict[str, Any]
    evals: list[tuple[int, int, int, int, float]] = field(default_factory=list)  # (iteration, step, saves, recoveries, val loss)
    train: list[tuple[int, int, float]] = field(default_factory=list)  # (iteration, step, train loss)
    events: list[dict[str, Any]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    save_times: list[float] = field(default_factory=list)
    recover_times: list[float] = field(default_factory=list)
    iterations: int = 0
    final_val: float = math.nan


def failure_schedule(seed: int, p_iter: float, iterations: int, num_stages: int) -> dict[int, list[int]]:
    """Iteration -> stages that fail before it; the same for every strategy of a (seed, rate)."""
    g = torch.Generator().manual_seed(10_007 * seed + round(p_iter * 1e6))
    hits = torch.rand(iterations, num_stages, generator=g) < p_iter
    return {int(i): [int(s) for s in hits[i].nonzero().flatten()] for i in hits.any(dim=1).nonzero().flatten()}


class SimPipeline:
    def __init__(self, cfg: ModelConfig, tcfg: TrainConfig, spec: RunSpec) -> None:
        self.cfg, self.tcfg, self.spec = cfg, tcfg, spec
        self.stages = build_stages(cfg, seed=spec.seed)
        self.opts = [build_optimizer(s, tcfg) for s in self.stages]
        self.step = 0
        self.grad_norms = [0.0] * cfg.num_stages  # after clipping: what CheckFree weights with
        self.raw_norms = [0.0] * cfg.num_stages
        self.reinits = 0
        self.checkpointer: ckpt.Checkpointer | None = None  # reload and auto: opened by the first save

    # -- training --------------------------------------------------------------------------
    def train_step(self, data: TextData) -> float:
        tc, n = self.tcfg, self.cfg.num_stages
        x, y = data.batch(self.step, tc.batch_size, self.cfg.seq_len, seed=tc.data_seed)
        mb = tc.batch_size // tc.micro_batches
        total = 0.0
        for m in range(tc.micro_batches):
            order = cf.execution_order(n, m) if self.spec.swap else list(range(n))
            h = self.stages[0].embed_tokens(x[m * mb:(m + 1) * mb])
            for s in order:
                h = self.stages[s].run_blocks(h)
            logits = self.stages[-1].logits(h)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[m * mb:(m + 1) * mb].reshape(-1))
            (loss / tc.micro_batches).backward()
            total += loss.item() / tc.micro_batches
        for i, (stage, (opt, sched)) in enumerate(zip(self.stages, self.opts)):
            raw = float(torch.nn.utils.clip_grad_norm_(stage.parameters(), tc.grad_clip))
            self.raw_norms[i], self.grad_norms[i] = raw, min(raw, tc.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        self.step += 1
        return total

    @torch.no_grad()
    def val_loss(self, data: TextData, batches: int) -> float:
        losses = []
        for b in range(batches):
            x, y = data.batch(b, 16, self.cfg.seq_len, seed=12345, split="val")
            h = x
            for s in self.stages:
                h = s(h)
            losses.append(F.cross_entropy(h.reshape(-1, h.shape[-1]), y.reshape(-1)).item())
        return sum(losses) / len(losses)

    @torch.no_grad()
    def probe_loss(self, data: TextData) -> float:
        """The loss of the last step's batch (``step - 1``) through the stages as they are now, in
        fixed order, with no update: against the loss that step recorded (before its update), how
        much a rebuild cost the model. What a pipeline can measure after a failure: the lost stage's
        weights are gone, the step's batch and loss are not."""
        tc = self.tcfg
        x, y = data.batch(self.step - 1, tc.batch_size, self.cfg.seq_len, seed=tc.data_seed)
        h = x
        for s in self.stages:
            h = s(h)
        return F.cross_entropy(h.reshape(-1, h.shape[-1]), y.reshape(-1)).item()

    # -- checkpoints (the real format) -----------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": {f"stage{i}": s.state_dict() for i, s in enumerate(self.stages)},
            "optim": {f"stage{i}": ckpt.OptimizerState(s, o).state_dict() for i, (s, (o, _)) in enumerate(zip(self.stages, self.opts))},
        }

    def save(self, url: str) -> None:
        """A snapshot as a job that checkpoints with ``ckpt.Checkpointer`` takes one: the loop
        pays the copy to host memory, and the write to storage goes on beside training."""
        if self.checkpointer is None:
            self.checkpointer = ckpt.Checkpointer(url, io_threads=2, keep_last=2)
        self.checkpointer.save(self.step, self.state(), force=True)

    def settle(self) -> None:
        """Wait until the snapshots taken so far are committed. Called before a recovery is
        timed: a job with node agents restores a snapshot from their memory once it is staged,
        so a write still under way is not part of what a reload costs."""
        if self.checkpointer is not None:
            self.checkpointer.wait()

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
            self.checkpointer = None

    def reload(self, url: str) -> int:
        """Every stage back to the newest checkpoint; from scratch when there is none yet."""
        steps = ckpt.committed_steps(ckpt.open_storage(url)) if os.path.exists(url) else []
        if not steps:
            self.stages = build_stages(self.cfg, seed=self.spec.seed)
            self.opts = [build_optimizer(s, self.tcfg) for s in self.stages]
            self.step = 0
            return 0
        state = self.state()
        step = ckpt.load(state, url, step=max(steps), io_threads=2)
        for i, (s, (o, sched)) in enumerate(zip(self.stages, self.opts)):
            s.load_state_dict(state["model"][f"stage{i}"])
            ckpt.OptimizerState(s, o).load_state_dict(state["optim"][f"stage{i}"])
            cf.restore_schedule_base(o, sched)  # (a rebuild since the checkpoint scaled it)
            set_schedule_step(sched, step)
        self.step = step
        return step

    # -- rebuilding one lost stage without rollback ----------------------------------------
    def rebuild(self, lost: list[int]) -> list[dict[str, Any]]:
        n, strategy = self.cfg.num_stages, self.spec.strategy
        norm = "l2_squared" if strategy == "average_sq" else "l2"
        rule = cf.NeighborAverage(cf.NeighborAverageConfig(norm=norm, lr_scale=self.spec.lr_scale))
        plans = {p.stage: p for p in cf.plan_recovery({s: 1 for s in lost}, num_stages=n)}
        out = []
        for s in lost:
            old = self.stages[s]
            replica = old.edge_layers()  # CheckFree+: the neighbour's copy, refreshed every step
            fresh = Stage(self.cfg, s, seed=self.spec.seed + 7919 * (self.step + 1))
            info: dict[str, Any] = {"stage": s, "step": self.step}
            plan = plans[s]
            if strategy == "random" or plan.action is cf.RecoveryAction.RELOAD:
                if plan.action is cf.RecoveryAction.RELOAD and strategy != "random":
                    self.reinits += 1
                    info["fallback"] = plan.reason
                info["how"] = "random"
            elif plan.action is cf.RecoveryAction.COPY_NEIGHBOR:
                partner = plan.sources[0]
                sd = cf.copy_from_neighbor(self.stages[partner].state_dict(), edge_replica=replica,
                                           keys=fresh.state_dict().keys())
                fresh.load_state_dict(sd)
                info["how"] = f"copy {partner} + edge replica"
            elif strategy == "copy":
                fresh.load_state_dict(cf.copy_from_neighbor(self.stages[s - 1].state_dict(), keys=fresh.state_dict().keys()))
                info["how"] = f"copy {s - 1}"
            else:
                gp, gn = self.grad_norms[s - 1], self.grad_norms[s + 1]
                w = rule.weights(gp, gn)
                fresh.load_state_dict(rule.rebuild(self.stages[s - 1].state_dict(), self.stages[s + 1].state_dict(),
                                                   prev_grad_norm=gp, next_grad_norm=gn))
                info.update(how="average", w_prev=w[0], norms=(gp, gn), raw_norms=(self.raw_norms[s - 1], self.raw_norms[s + 1]))
            self.stages[s] = fresh
            opt, sched = build_optimizer(fresh, self.tcfg, step=self.step)
            cf.prepare_rebuilt_optimizer(opt, sched, lr_scale=self.spec.lr_scale)
            self.opts[s] = (opt, sched)
            out.append(info)
        return out


def run(
    spec: RunSpec,
    cfg: ModelConfig,
    tcfg: TrainConfig,
    data: TextData,
    *,
    fork_at: tuple[int, ...] = (),
    start: tuple[SimPipeline, RunResult] | None = None,
) -> tuple[RunResult, dict[int, tuple[SimPipeline, RunResult]]]:
    """Train until the training step reaches ``spec.steps`` (reload needs more iterations to get there).

    Times are measured per kind (a training iteration, a checkpoint save, a recovery) so that
    a wall-clock axis can be modelled from their medians: the machine may be shared and noisy.

    Runs of one seed are identical until their first failure, so a run without failures can
    hand out copies of itself at iterations ``fork_at`` and a failing run can ``start`` from
    one (not for ``reload``, whose checkpoints the copy does not have).
    """
    schedule = {} if spec.strategy == "none" else failure_schedule(spec.seed, spec.p_iter, 4 * spec.steps, cfg.num_stages)
    forks: dict[int, tuple[SimPipeline, RunResult]] = {}
    if start is None:
        torch.manual_seed(spec.seed)
        res = RunResult(spec=asdict(spec))
        sim = SimPipeline(cfg, tcfg, spec)
    else:
        if spec.strategy in ("reload", "auto"):
            raise ValueError(f"a {spec.strategy} run cannot start from a fork: it needs its own checkpoints")
        sim, res = copy.deepcopy(start)
        sim.spec, res.spec = spec, asdict(spec)
    it = res.iterations
    saves = recoveries = 0
    tracker = cf.LossBumpTracker(prior_steps=AUTO_PRIOR_STEPS, window=5, prior_steps_per_bump=spec.auto_prior_steps_per_bump,
                                 steps_floor=spec.auto_steps_floor)
    last_save: int | None = None
    took: dict[str, list[float]] = {"reload": [], "average": []}  # auto's measured recovery times
    with tempfile.TemporaryDirectory(prefix="checkfree-") as tmp:
        url = os.path.join(tmp, "run")
        while sim.step < spec.steps and it < 4 * spec.steps:
            if it in fork_at:
                res.iterations = it
                forks[it] = copy.deepcopy((sim, res))
            lost = schedule.get(it, [])
            if lost:
                sim.settle()
                before = sim.val_loss(data, 2)
                t0 = time.perf_counter()
                choice, reason, bump, events = spec.strategy, "", None, []
                plans = cf.plan_recovery({s: 1 for s in lost}, num_stages=cfg.num_stages)
                recorded = res.train[-1][2] if res.train and res.train[-1][1] == sim.step else None
                if spec.strategy == "auto" and recorded is not None and \
                        cf.worth_probing(plans, None if last_save is None else sim.step - last_save):
                    # rebuild first, measure what it cost on the last step's batch, then choose
                    events = sim.rebuild(lost)
                    bump = sim.probe_loss(data) - recorded
                    choice, reason = auto_choice(sim, lost, res.step_times, took, last_save, tracker, bump=bump)
                elif spec.strategy == "auto":
                    choice, reason = auto_choice(sim, lost, res.step_times, took, last_save, tracker)
                if choice == "reload":
                    frm = sim.step
                    to = sim.reload(url)
                    events = [{"stages": lost, "how": "reload", "from_step": frm, "to_step": to, "probe_bump": bump}]
                else:
                    if spec.strategy == "auto" and res.train:
                        tracker.start(res.train[-1][2], bump=bump)
                    events = events or sim.rebuild(lost)
                took["reload" if choice == "reload" else "average"].append(time.perf_counter() - t0)
                for e in events:
                    e.update(chosen=choice, reason=reason)
                res.recover_times.append(time.perf_counter() - t0)
                recoveries += 1
                after = sim.val_loss(data, 2)
                # (the same batch's loss before the failure: recorded when that step was trained)
                probe = bump if bump is not None or recorded is None or choice == "reload" else \
                    sim.probe_loss(data) - recorded
                for e in events:
                    e.update(iteration=it, val_before=before, val_after=after)
                    e.setdefault("probe_bump", probe)
                res.events += events
            t0 = time.perf_counter()
            loss = sim.train_step(data)
            res.step_times.append(time.perf_counter() - t0)
            tracker.observe(loss)
            if spec.strategy in ("reload", "auto") and sim.step % spec.ckpt_every == 0:
                t0 = time.perf_counter()
                sim.save(url)
                res.save_times.append(time.perf_counter() - t0)
                saves += 1
                last_save = sim.step
            it += 1
            res.train.append((it, sim.step, loss))
            if sim.step % spec.eval_every == 0 or sim.step == spec.steps:
                res.evals.append((it, sim.step, saves, recoveries, sim.val_loss(data, spec.eval_batches)))
        sim.close()
    res.iterations = it
    res.final_val = sim.val_loss(data, spec.final_eval_batches)
    res.spec["reinit_fallbacks"] = sim.reinits
    return res, forks


def auto_choice(sim: SimPipeline, lost: list[int], step_times: list[float], took: dict[str, list[float]],
                last_save: int | None, tracker: cf.LossBumpTracker, *, bump: float | None = None) -> tuple[str, str]:
    """Policy ``auto`` (:class:`recovery.checkfree.AutoPolicy`, as ``RayPipeline`` runs it): reload
    or rebuild, by :func:`recovery.checkfree.decide_auto` on what this run measured so far;
    ``bump``: measured after a tentative rebuild (its cost is then spent either way)."""
    med = statistics.median
    reloads, rebuilds = took["reload"], took["average"]
    measured = bump is not None and tracker.steps_per_bump is not None
    inputs = cf.AutoInputs(
        step_seconds=med(step_times[-20:]) if step_times else 1.0,
        steps_since_snapshot=None if last_save is None else sim.step - last_save,
        reload_seconds=med(reloads) if reloads else 0.0,
        rebuild_seconds=0.0 if measured else med(rebuilds) if rebuilds else 0.0,
        recovery_steps=tracker.recovery_steps, recovery_steps_measured=tracker.events > 0,
        measured_bump=bump if measured else None, steps_per_bump=tracker.steps_per_bump if measured else None,
        steps_per_bump_measured=bool(tracker.measured))
    plans = cf.plan_recovery({s: 1 for s in lost}, num_stages=sim.cfg.num_stages)
    chosen, reason = cf.AutoPolicy().choose(plans, inputs)
    return ("reload" if chosen == "reload" else "average"), reason
