"""One run of the comparison on the real pipeline: ``recovery.pipeline.RayPipeline`` with one Ray
actor process per stage, gloo between them, CheckFree+'s swapped micro-batch order across the
processes, stages lost by SIGKILL and rebuilt by the library's own recovery (neighbour average
for an interior stage; the swap partner plus its edge-layer replica for the first and last).

Same model, data, initial weights and failure schedule as the simulated runs (``sim.py``), so
its row sits beside theirs. The validation loss is computed in the driver from the stages'
weights (read for the measurement only; the recovery itself never routes weights through it).
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from examples.pipeline_demo import ModelConfig, TextData, TextPipeline, TrainConfig
from recovery.events import EventLog
from recovery.pipeline import PipelineConfig, RayPipeline, StageLostError

from .sim import RunResult, RunSpec, SimPipeline, failure_schedule


def run_real(spec: RunSpec, cfg: ModelConfig, tcfg: TrainConfig, data: TextData, corpus_bytes: int) -> RunResult:
    """Train ``spec`` on a fresh local Ray cluster (2 CPUs) and shut it down after."""
    import ray

    torch.manual_seed(spec.seed)
    res = RunResult(spec=asdict(spec))
    schedule = failure_schedule(spec.seed, spec.p_iter, 4 * spec.steps, cfg.num_stages)
    probe = SimPipeline(cfg, tcfg, spec)  # holds copies of the stages' weights to evaluate them

    def val(batches: int) -> float:
        for i, stage in enumerate(probe.stages):
            stage.load_state_dict(pipe.snapshot(i)["model"])
        return probe.val_loss(data, batches)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        pipe = RayPipeline(
            PipelineConfig(
                seed=spec.seed,
                swap=spec.swap,
                lr_scale=spec.lr_scale,
                actor_num_cpus=0.25,
                pg_timeout_s=300,
                step_timeout_s=600,
            ),
            TextPipeline(model=cfg, train=tcfg, corpus_bytes=corpus_bytes),
            events=EventLog(echo=None),
        )
        it = recoveries = 0
        while pipe.step < spec.steps and it < 4 * spec.steps:
            lost = schedule.get(it, [])
            if lost:
                before = val(2)
                norms = list(pipe.history[-1]["grad_norms"]) if pipe.history else [0.0] * cfg.num_stages
                for s in lost:
                    pipe.kill_stage(s)
                try:
                    pipe.train(1)
                    raise RuntimeError(f"stages {lost} were killed but the step went through")
                except StageLostError as e:
                    event = pipe.recover(e.ranks, "neighbor_average")
                res.recover_times.append(event["seconds"])
                recoveries += 1
                after = val(2)
                for s in lost:
                    info = {
                        "stage": s,
                        "step": pipe.step,
                        "how": event["how"].get(s, event["chosen"]),
                        "iteration": it,
                        "val_before": before,
                        "val_after": after,
                        "seconds": event["seconds"],
                        "fetch_seconds": event.get("fetch_seconds", 0.0),
                    }
                    if info["how"] == "average":
                        info.update(w_prev=event["weights"][s][0], norms=(norms[s - 1], norms[s + 1]))
                    res.events.append(info)
            t0 = time.perf_counter()
            rec = pipe.train(1)[0]
            res.step_times.append(time.perf_counter() - t0)
            it += 1
            res.train.append((it, pipe.step, rec["loss"]))
            if pipe.step % spec.eval_every == 0 or pipe.step == spec.steps:
                res.evals.append((it, pipe.step, 0, recoveries, val(spec.eval_batches)))
        res.iterations = it
        res.final_val = val(spec.final_eval_batches)
        res.spec["reinit_fallbacks"] = 0
        pipe.shutdown()
    finally:
        ray.shutdown()
    return res
