"""The README's main job: train a small model on Ray workers under the coordinator with node
agents, kill a worker, recover, and print what it cost.

    python -m recovery.demo [--run DIR] [--workers 4] [--steps 60] [--kill-at 33] [--hang-at 47]

Local Ray cluster (started here, stopped at the end) and local storage (a new temp dir, or
``--run``). Each worker trains a data-parallel copy of the model on its slice of a global
batch; gradients are averaged with torch.distributed (gloo). A checkpoint every
``--every`` steps goes to the node agent's memory at once and to storage in the background;
the coordinator commits it. At ``--kill-at`` one worker's process is killed with SIGKILL; with
``--hang-at`` a worker of the restarted job stops making progress, which the coordinator
notices after ``--hang-timeout`` seconds.

:class:`DemoTrainer` is the ``train_fn``; tests reuse it with their own :class:`Fault` list.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .worker import TrainContext

KILL, HANG, KILL_COORDINATOR, KILL_AGENT, TAKE_SLOT, RAISE, STORAGE_DOWN, STORAGE_UP, SLOW = (
    "kill", "hang", "kill_coordinator", "kill_agent", "take_slot", "raise", "storage_down", "storage_up", "slow")


@dataclass(frozen=True, slots=True)
class Fault:
    """Injected by rank ``rank`` of attempt ``attempt`` just before it trains ``step``.

    ``kill``: SIGKILL its own process. ``hang``: stop making progress (sleep). ``raise``: an
    exception out of ``train_fn``. ``kill_coordinator``: kill the coordinator actor (Ray
    restarts it). ``kill_agent``: kill the node agent actor of its node. ``take_slot``: start a
    detached actor named ``slot_taker`` holding ``resources`` (it waits for them), so that a
    restart finds less room. ``storage_down`` / ``storage_up`` (local storage only): move the
    run directory away and put a file in its place (every read and write of the run fails;
    the time is written to ``<run>.down-at``), and undo it. ``slow``: from this step on (to
    ``until``, exclusive; None: to the end of the attempt) its compute takes ``factor`` times as
    long (a degraded GPU, a throttled host); the time it began is in its return, ``slowed_at``.
    """

    kind: str
    step: int
    rank: int = 0
    attempt: int = 0
    resources: dict[str, float] = field(default_factory=dict)
    factor: float = 2.0
    until: int | None = None


@dataclass(frozen=True, slots=True)
class DemoTrainer:
    """A small MLP regression trained data-parallel; deterministic per (seed, step), so a run
    that recovers ends with the same parameters as one that never failed (same world size)."""

    steps: int = 60
    width: int = 256
    depth: int = 4
    global_batch: int = 48
    lr: float = 1e-3
    seed: int = 0
    step_sleep_s: float = 0.0
    # Seconds of compute each step simulates on top of the model's (a sleep inside ctx.timed(),
    # standing in for the forward and backward of a larger model; a SLOW fault stretches it too).
    compute_s: float = 0.0
    faults: tuple[Fault, ...] = ()
    return_state: bool = False  # every rank returns its parameters ("state")
    log_losses: bool = False  # the state holds a LossLog of every step trained; every rank returns it ("losses")

    def build(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(self.seed)
        layers: list[torch.nn.Module] = []
        for _ in range(self.depth):
            layers += [torch.nn.Linear(self.width, self.width), torch.nn.GELU()]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(self.width, 1))
        return model, torch.optim.AdamW(model.parameters(), lr=self.lr)

    def batch(self, step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        x = torch.randn(self.global_batch, self.width, generator=g)
        y = x[:, : self.width // 2].sum(dim=1, keepdim=True).sin()
        return torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank]

    def train_step(self, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, rank: int, world: int,
                   reduce: Any, ctx: TrainContext | None = None, slow: float = 1.0) -> tuple[float, float]:
        # The rank's own compute, timed (ctx.timed): what the coordinator compares between ranks
        # to find stragglers; the gradient all-reduce after it waits for the slowest rank.
        with ctx.timed() if ctx is not None else contextlib.nullcontext():
            t0 = time.perf_counter()
            x, y = self.batch(step, rank, world)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            if self.compute_s:
                time.sleep(self.compute_s)
            if slow > 1:
                time.sleep((slow - 1) * (time.perf_counter() - t0))
        reduce([p.grad for p in model.parameters()])
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        return float(loss), float(norm)

    def __call__(self, ctx: TrainContext) -> dict[str, Any]:
        # A heal hands back the objects this process trained in the attempt before (no copy).
        state = ctx.live_state or self.build_state()
        model, opt = state["model"], state["optim"]
        start = ctx.resume(state)  # a checkpoint (reload), or a survivor's live state (heal)
        ctx.checkpointer.attach(opt)
        world = ctx.world_size

        def reduce(grads: list[torch.Tensor]) -> None:
            average_gradients(grads, world)

        loss = norm = float("nan")
        slowed_at = None
        for step in range(start, self.steps):
            self._inject(ctx, step)
            slow = self.slowdown(ctx.rank, ctx.attempt, step)
            if slow > 1 and slowed_at is None:
                slowed_at = time.time()
            loss, norm = self.train_step(model, opt, step, ctx.rank, world, reduce, ctx, slow)
            if self.log_losses:
                state["losses"].add(step, ctx.attempt, loss)
            ctx.checkpointer.save(step, state)
            ctx.report(step, loss=loss, grad_norm=norm)  # after the optimizer step: step is applied
            if self.step_sleep_s:
                time.sleep(self.step_sleep_s)
        ctx.checkpointer.wait()
        out: dict[str, Any] = {"rank": ctx.rank, "world_size": world, "attempt": ctx.attempt, "start": start,
                               "loss": loss, "restore_step": ctx.restore_step, "slowed_at": slowed_at,
                               "restored": None if ctx.checkpointer.last_restore is None
                               else ctx.checkpointer.last_restore.to_dict()}
        if self.return_state:
            out["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.log_losses:
            out["losses"] = state["losses"].state_dict()
        out["heal_step"] = ctx.heal_step
        return out

    def build_state(self) -> dict[str, Any]:
        model, opt = self.build()
        state: dict[str, Any] = {"model": model, "optim": opt}
        if self.log_losses:
            state["losses"] = LossLog()
        return state

    def slowdown(self, rank: int, attempt: int, step: int) -> float:
        """How many times slower than normal this rank computes ``step`` (SLOW faults)."""
        out = 1.0
        for f in self.faults:
            if f.kind == SLOW and (f.rank, f.attempt) == (rank, attempt) and f.step <= step \
                    and (f.until is None or step < f.until):
                out *= f.factor
        return out

    def _inject(self, ctx: TrainContext, step: int) -> None:
        for f in self.faults:
            if (f.step, f.rank, f.attempt) != (step, ctx.rank, ctx.attempt):
                continue
            if f.kind == SLOW:
                continue  # applied by train_step (slowdown)
            if f.kind == KILL:
                os.kill(os.getpid(), signal.SIGKILL)
            elif f.kind == HANG:
                while True:
                    time.sleep(3600)
            elif f.kind == RAISE:
                raise RuntimeError(f"injected error at step {step}")
            elif f.kind == KILL_COORDINATOR:
                import ray

                ray.kill(ray.get_actor(ctx.coordinator_name), no_restart=False)
            elif f.kind == KILL_AGENT:
                import ray

                from .node_agent import agent_actor_name

                ray.kill(ray.get_actor(agent_actor_name(ctx.coordinator_name, ctx.node)))
            elif f.kind in (STORAGE_DOWN, STORAGE_UP):
                _storage_outage(ctx.checkpointer.storage.url, down=f.kind == STORAGE_DOWN)
            elif f.kind == TAKE_SLOT:
                import ray

                holder = ray.remote(num_cpus=0)(_SlotHolder)
                holder.options(name="slot_taker", lifetime="detached", resources=dict(f.resources)).remote()
            else:
                raise ValueError(f"unknown fault kind {f.kind!r}")

    def reference(self, world: int, steps: int | None = None,
                  resized: tuple[tuple[int, int], ...] = ()) -> dict[str, torch.Tensor]:
        """The parameters after ``steps`` uninterrupted steps with ``world`` data-parallel ranks,
        computed in this process (the ranks' gradients summed in rank order, as gloo does for
        two ranks). ``resized``: (step, world) pairs, the world size from that step on."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._reference(world, steps if steps is not None else self.steps, dict(resized))
        finally:
            torch.set_num_threads(threads)

    def _reference(self, world: int, steps: int, resized: dict[int, int]) -> dict[str, torch.Tensor]:
        model, opt = self.build()
        for step in range(steps):
            world = resized.get(step, world)
            grads_by_rank = []
            for rank in range(world):  # every replica holds the same parameters: one model serves all
                x, y = self.batch(step, rank, world)
                torch.nn.functional.mse_loss(model(x), y).backward()
                grads_by_rank.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
                opt.zero_grad(set_to_none=False)
            total = grads_by_rank[0].clone()
            for g in grads_by_rank[1:]:
                total += g
            total /= world
            offset = 0
            for p in model.parameters():
                p.grad.copy_(total[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=False)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


class LossLog:
    """Every step trained, with the attempt that trained it and its loss (a stateful part of the
    training state: checkpointed, restored, and copied by a heal like the model)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.attempts: list[int] = []
        self.losses: list[float] = []

    def add(self, step: int, attempt: int, loss: float) -> None:
        self.steps.append(step)
        self.attempts.append(attempt)
        self.losses.append(loss)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "attempts": list(self.attempts), "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.attempts = [int(s) for s in state["steps"]], [int(a) for a in state["attempts"]]
        self.losses = [float(v) for v in state["losses"]]


def average_gradients(grads: list[torch.Tensor], world: int) -> None:
    """All-reduce ``grads`` (one flat buffer) over the default process group and average."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def _storage_outage(url: str, *, down: bool) -> None:
    path = url.removeprefix("file://")
    if "://" in path:
        raise ValueError(f"storage_down/storage_up need local storage, not {url}")
    path = path.rstrip("/")
    if down:
        os.rename(path, path + ".away")
        with open(path, "w") as fh:
            fh.write("storage outage injected by recovery.demo\n")
        with open(path + ".down-at", "w") as fh:
            fh.write(repr(time.time()))
    else:
        os.unlink(path)
        os.rename(path + ".away", path)


class _SlotHolder:
    def ping(self) -> bool:
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recovery.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="run directory or fsspec URL (default: a new temp dir)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--width", type=int, default=512, help="model width (state grows with its square)")
    parser.add_argument("--kill-at", type=int, default=33, help="step at which a worker is killed (-1: never)")
    parser.add_argument("--hang-at", type=int, default=-1, help="step at which a worker of the restarted job hangs")
    parser.add_argument("--hang-timeout", type=float, default=5.0)
    parser.add_argument("--step-sleep", type=float, default=0.05, help="extra seconds per step (pacing)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    parser.add_argument("--address", default=None,
                        help="join this Ray cluster ('auto', ray://host:10001) instead of starting a local one")
    parser.add_argument("--agent", default="actor",
                        help="'actor' (an agent per node run by recovery), 'none', or the address of the agent "
                             "already running on every node, e.g. unix:///run/ckpt-agent/agent.sock")
    parser.add_argument("--cpus-per-worker", type=float, default=None)
    args = parser.parse_args(argv)

    from . import launcher

    run_dir = args.run or tempfile.mkdtemp(prefix="recovery-demo-")
    faults = []
    if args.kill_at >= 0:
        faults.append(Fault(KILL, args.kill_at, rank=min(2, args.workers - 1), attempt=0))
    if args.hang_at >= 0:
        faults.append(Fault(HANG, args.hang_at, rank=min(1, args.workers - 1), attempt=1 if faults else 0))
    trainer = DemoTrainer(steps=args.steps, width=args.width, step_sleep_s=args.step_sleep, faults=tuple(faults))
    model, _opt = trainer.build()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"run: {run_dir}")
    print(f"model: MLP {trainer.depth}x{trainer.width}, {params / 1e6:.1f} MB of parameters (+ Adam moments, "
          f"{3 * params / 1e6:.1f} MB of state); {args.workers} data-parallel workers; checkpoint every "
          f"{args.every} steps; injected: {', '.join(f'{f.kind} rank {f.rank} at step {f.step}' for f in faults) or 'nothing'}")
    ncpu = args.num_cpus or os.cpu_count() or 2
    cpus = args.cpus_per_worker if args.cpus_per_worker is not None else (
        1.0 if args.address else min(1.0, ncpu / (args.workers + 1)))
    t0 = time.perf_counter()
    try:
        result = launcher.run(
            trainer, num_workers=args.workers, storage=run_dir, policy="reload", max_failures=3,
            address=args.address, num_cpus=None if args.address else ncpu,
            ray_init_options={"log_to_driver": False}, agent=None if args.agent == "none" else args.agent,
            resources_per_worker={"CPU": cpus},
            every_n_steps=args.every, keep_last=3, hang_timeout_s=args.hang_timeout, startup_timeout_s=120,
            backoff_s=0.5, placement_timeout_s=20, agent_memory_bytes=1 << 30)
    except Exception as e:  # noqa: BLE001 - the demo reports, then fails
        print(f"FAILED: {type(e).__name__}: {e}")
        res = getattr(e, "result", None)
        if res is not None:
            print(res.summary())
        return 1
    print()
    print("summary")
    print("-------")
    print(result.summary())
    losses = [r["loss"] for r in result.returns if r]
    print(f"final loss {sum(losses) / max(1, len(losses)):.4f}; wall time {time.perf_counter() - t0:.1f} s")
    print(f"inspect the checkpoints with: ckpt ls {run_dir}")
    ok = all(r is not None for r in result.returns) and (not faults or result.failures)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
