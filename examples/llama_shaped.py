"""A ``train_fn`` for ``recovery.run`` whose state has the shape of Llama-70B with tiny tensors:
80 layers x 9 weights (``layers.<i>.attention.wq.weight`` ...) and Adam's two moments of each,
2,160 arrays, trained data-parallel on gloo. ``packed=True`` holds the same bytes in 8 tensors
(the comparison that shows what the per-array costs are).

Training is deterministic and exact across world sizes: each rank's gradient is a multiple of
2**-14 small enough that gloo's sum of them is exact in float32 in any order, so the state after
``n`` steps is one function of ``n`` (:meth:`LlamaShapedTrainer.reference`) and a restored state
can be compared bit for bit (:func:`digest`).

``python -m examples.llama_shaped`` runs it under ``recovery.run`` on a local Ray cluster (8
workers, one killed at step 8), prints the run's summary and checks that every worker restored
bit for bit from its node agent's memory. ``tests/integration/test_restore_shapes.py`` asserts
the same.

Every rank waits for the others' restores (a barrier) before it hashes its restored state and
trains. ``benchmarks/bench_restore_shapes.py`` measures each rank's restore, and 8 ranks share
this machine's few cores. Without the barrier, the ranks that finished first hashed their 2,160
tensors (about 15 ms of CPU each) and computed their first step beside the slower ranks'
restores. The 2,160-array side was then measured against that work, the 8-tensor side against
next to none.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

LAYERS = 80
WEIGHTS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
           "feed_forward.w3", "attention_norm", "ffn_norm")
PACKS = 8


def digest(state: dict[str, Any]) -> str:
    """sha256 of every tensor's bytes, in key order."""
    h = hashlib.sha256()
    for kind in ("model", "exp_avg", "exp_avg_sq"):
        for name in sorted(state[kind]):
            t = state[kind][name].detach().contiguous()
            h.update(name.encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class LlamaShapedTrainer:
    steps: int = 12
    layers: int = LAYERS
    rows: int = 8
    cols: int = 8
    packed: bool = False  # the same bytes in 8 tensors
    # rank kill_rank SIGKILLs itself before this step (first attempt), once every checkpoint it
    # took is committed: the restore step is then the last save before kill_at, whatever the speed
    kill_at: int | None = None
    kill_rank: int = 1
    lr: float = 2.0**-6

    def names(self) -> list[str]:
        if self.packed:
            return [f"pack{i}" for i in range(PACKS)]
        return [f"layers.{i}.{w}.weight" for i in range(self.layers) for w in WEIGHTS]

    def build(self) -> dict[str, Any]:
        names = self.names()
        n = len(WEIGHTS) * self.layers * self.rows * self.cols
        g = torch.Generator().manual_seed(0)
        flat = torch.randint(-64, 64, (n,), generator=g, dtype=torch.int32).float() * 2.0**-6
        parts = flat.chunk(len(names)) if self.packed else flat.split(self.rows * self.cols)
        shape = None if self.packed else (self.rows, self.cols)
        model = {k: (p.clone() if shape is None else p.reshape(shape).clone()) for k, p in zip(names, parts)}
        return {"model": model, "exp_avg": {k: torch.zeros_like(v) for k, v in model.items()},
                "exp_avg_sq": {k: torch.zeros_like(v) for k, v in model.items()}}

    def grads(self, state: dict[str, Any], step: int, rank: int) -> list[torch.Tensor]:
        # multiples of 2**-14 below 2**4: any sum of 8 of them is exact in float32
        return [torch.round(p * 2.0**6) * (2.0**-14 * (1 + (step + rank) % 3)) for p in state["model"].values()]

    def update(self, state: dict[str, Any], grads: list[torch.Tensor]) -> None:
        params, m, v = (list(state[k].values()) for k in ("model", "exp_avg", "exp_avg_sq"))
        torch._foreach_mul_(m, 0.5)
        torch._foreach_add_(m, grads, alpha=0.5)
        torch._foreach_mul_(v, 0.75)
        torch._foreach_addcmul_(v, grads, grads, value=0.25)
        denom = torch._foreach_add(torch._foreach_sqrt(v), 2.0**-10)
        torch._foreach_addcdiv_(params, m, denom, value=-self.lr)

    def reference(self, steps: int, world: int) -> dict[str, Any]:
        """The state after ``steps`` steps of ``world`` ranks, computed here."""
        state = self.build()
        for step in range(steps):
            per_rank = [self.grads(state, step, r) for r in range(world)]
            self.update(state, [sum(gs[1:], gs[0].clone()) / world for gs in zip(*per_rank)])
        return state

    def restore(self, ctx: Any, state: dict[str, Any]) -> int:
        """Load the newest checkpoint into ``state``; the step to start from (0: none)."""
        return ctx.checkpointer.restore(state) or 0

    def __call__(self, ctx: Any) -> dict[str, Any]:
        state = self.build()
        start = self.restore(ctx, state)
        dist.barrier()  # every rank restored before any hashes its state or trains: see the module
        restored = digest(state)
        world = ctx.world_size
        for step in range(start, self.steps):
            if self.kill_at == step and ctx.rank == self.kill_rank and ctx.attempt == 0:
                ctx.checkpointer.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            grads = self.grads(state, step, ctx.rank)
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= world
            self.update(state, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])
            ctx.checkpointer.save(step, state)
            ctx.report(step)
        ctx.checkpointer.wait()
        report = ctx.checkpointer.last_restore
        return {"rank": ctx.rank, "attempt": ctx.attempt, "start": start, "restored_digest": restored,
                "final_digest": digest(state), "restore": None if report is None else report.to_dict()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="run directory or fsspec URL (default: a new temp dir)")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--kill-at", type=int, default=8, help="step before which the last rank is killed (-1: never)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    parser.add_argument("--packed", action="store_true", help="the same bytes in 8 tensors (the per-array cost's baseline)")
    args = parser.parse_args(argv)

    import recovery

    run_dir = args.run or tempfile.mkdtemp(prefix="llama-shaped-")
    trainer = LlamaShapedTrainer(layers=args.layers, kill_at=None if args.kill_at < 0 else args.kill_at,
                                 kill_rank=args.workers - 1, packed=args.packed)
    ncpu = args.num_cpus or os.cpu_count() or 2
    print(f"run: {run_dir}; {args.workers} workers x {3 * len(WEIGHTS) * args.layers} arrays")
    result = recovery.run(trainer, num_workers=args.workers, storage=run_dir, num_cpus=ncpu,
                          ray_init_options={"log_to_driver": False}, resources_per_worker={"CPU": ncpu / args.workers},
                          every_n_steps=5, keep_last=None, max_failures=1, startup_timeout_s=300,
                          agent_memory_bytes=1 << 30)
    print(result.summary())
    returns = sorted(result.returns, key=lambda r: r["rank"])
    ok = all(r["final_digest"] == digest(trainer.reference(trainer.steps, args.workers)) for r in returns)
    for rec in result.failures:
        at = digest(trainer.reference(rec.restore_step + 1, args.workers))
        ok = ok and all(r["restored_digest"] == at for r in returns) and not rec.fallbacks
        print(f"restored step {rec.restore_step} from {rec.restored_from} in {rec.restore_s:.2f} s (slowest rank): "
              f"{rec.restore_bytes}; fallbacks: {rec.fallbacks or 'none'}")
    print("bit-exact, no fallback" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
