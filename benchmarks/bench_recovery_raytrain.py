"""The ``raytrain_kill`` scenario of ``bench_recovery.py``: the ``kill`` scenario's job under Ray
Train's ``TorchTrainer`` with ``FailureConfig``, checkpointing the way its guide does (rank 0
``torch.save`` + ``ray.train.report``; every rank ``torch.load`` on restart), for the side-by-side
table. Run it through ``bench_recovery.py --scenarios kill,raytrain_kill``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def run_raytrain_kill(args: argparse.Namespace) -> dict[str, Any]:
    """The ``kill`` scenario under Ray Train (``TorchTrainer``, ``FailureConfig``), the way its
    guide checkpoints: rank 0 ``torch.save``s the model and optimizer state into a directory
    and ``ray.train.report``s it (uploaded to ``storage_path``); on restart every rank
    ``torch.load``s the latest. Same model, data, world size, checkpoint interval and fault
    step as ``kill``. Ray Train does not say when it noticed the death, so the figures are from
    the kill: to the restarted train function, restore time, to the first resumed step."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import torch

    try:
        import ray
        import ray.train
        from ray.train.torch import TorchTrainer
    except ImportError as e:
        return {"scenario": "raytrain_kill", "skipped": f"Ray Train is not installed ({e}); pip install 'ray[train]'"}
    from recovery.demo import DemoTrainer, average_gradients

    trainer = DemoTrainer(steps=args.steps, width=args.width, depth=args.depth, step_sleep_s=args.step_sleep)
    root = tempfile.mkdtemp(prefix="bench-recovery-raytrain-", dir=args.root)
    marks = os.path.join(root, "marks")
    os.makedirs(marks)
    every, fault_at, workers = args.every, args.fault_at, args.workers

    def mark(name: str, value: Any) -> None:
        with open(os.path.join(marks, name), "w") as fh:
            fh.write(json.dumps(value))

    def loop(config: dict[str, Any]) -> None:
        import signal

        ctx = ray.train.get_context()
        rank = ctx.get_world_rank()
        torch.set_num_threads(1)
        model, opt = trainer.build()
        start = 0
        ck = ray.train.get_checkpoint()
        if ck is not None:
            t0 = time.time()
            with ck.as_directory() as d:
                saved = torch.load(os.path.join(d, "state.pt"), weights_only=True)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optim"])
            start = saved["step"] + 1
            mark(f"restore-{rank}", {"start": start, "seconds": time.time() - t0, "began": t0})

        def reduce(grads: list[torch.Tensor]) -> None:
            average_gradients(grads, workers)

        for step in range(start, trainer.steps):
            if step == fault_at and rank == workers - 1 and ck is None:
                mark("killed", {"at": time.time(), "step": step})
                os.kill(os.getpid(), signal.SIGKILL)
            trainer.train_step(model, opt, step, rank, workers, reduce)
            if rank == 0:
                mark("progress", {"step": step, "at": time.time(), "start": start})
                if ck is not None and step == start:
                    mark("resumed", {"step": step, "at": time.time()})
            if step % every == 0:
                t0 = time.time()
                with tempfile.TemporaryDirectory() as d:
                    if rank == 0:
                        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step},
                                   os.path.join(d, "state.pt"))
                    ray.train.report({"step": step},
                                     checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
                if rank == 0:
                    stalls = Path(marks, "stalls")
                    mark("stalls", (json.loads(stalls.read_text()) if stalls.exists() else []) + [time.time() - t0])
            if trainer.step_sleep_s:  # as DemoTrainer does after each step
                time.sleep(trainer.step_sleep_s)

    ncpu = os.cpu_count() or 2
    ray.init(address="local", num_cpus=ncpu, include_dashboard=False, log_to_driver=False, configure_logging=False)
    t0 = time.perf_counter()
    try:
        TorchTrainer(
            loop, scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=False,
                resources_per_worker={"CPU": min(1.0, ncpu / (workers + 1))}),
            run_config=ray.train.RunConfig(
                storage_path=root, name="run", failure_config=ray.train.FailureConfig(max_failures=3),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        ).fit()
        wall = time.perf_counter() - t0

        def read(name: str) -> Any:
            path = Path(marks, name)
            return json.loads(path.read_text()) if path.exists() else None

        killed, resumed = read("killed"), read("resumed")
        restores = [read(f"restore-{r}") for r in range(workers)]
        row: dict[str, Any] = {"scenario": "raytrain_kill", "wall_s": wall,
                               "stall_s": statistics.median(read("stalls") or [float("nan")])}
        if killed and resumed and all(restores):
            began = min(r["began"] for r in restores)
            start = restores[0]["start"]
            row.update(kind="worker_died", restarted_after_s=began - killed["at"],
                       restore_s=max(r["seconds"] for r in restores), restored_from="storage",
                       kill_to_resumed_s=resumed["at"] - killed["at"], restore_step=start - 1,
                       steps_lost=killed["step"] - 1 - (start - 1))
        return row
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
