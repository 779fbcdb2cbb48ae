"""One pipeline stage in its own process (a Ray actor): its module, optimizer and schedule
built by the caller's :class:`PipelineModel`, and its peers over gloo.

A step is GPipe's: every micro-batch forward along its route (``schedule``: fixed order, or
CheckFree+'s swapped order on odd micro-batches), then every micro-batch backward (gradients
the other way); with data-parallel replicas, the gradients of each stage's replicas are
averaged (an all-reduce in the stage's group); gradient clipping, and an all-reduce that every
process passes before any updates, so that a process lost during the step leaves every
survivor at the same step.

State that a new process needs from a live one (a replica's full state, a neighbour's weights,
an edge-layer replica) leaves its holder by ``ray.put`` there and is fetched by the receiver
with ``ray.get``: the driver only passes references, never the tensors.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from torch import nn

import ckpt

from ..checkfree.rule import (
    NeighborAverage,
    NeighborAverageConfig,
    copy_from_neighbor,
    prepare_rebuilt_optimizer,
    restore_schedule_base,
)
from .schedule import BLOCKS, EMBED, HEAD, rank_of, route, stage_of, stage_parts
from .spec import PipelineConfig, PipelineModel, StageInit


def stage_state(stage: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in stage.state_dict().items()}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A deep copy of an optimizer's state dict (tensors cloned), for comparisons."""
    sd = optimizer.state_dict()
    return {
        "state": {k: {n: (t.detach().clone() if isinstance(t, torch.Tensor) else t) for n, t in v.items()}
                  for k, v in sd["state"].items()},
        "param_groups": [dict(g) for g in sd["param_groups"]],
    }


class StageWorker:
    """Plain class; :class:`RayPipeline` wraps it with ``ray.remote``. ``rank`` is the process's
    rank (``replica * num_stages + stage``; the stage's index with one replica per stage);
    ``init`` says where a replacement gets its state (:class:`StageInit`), else the stage
    starts from ``seed``."""

    def __init__(self, cfg: PipelineConfig, model: PipelineModel, rank: int | None, *, step: int = 0,
                 seed: int | None = None, init: StageInit | None = None) -> None:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.cfg, self.model = cfg, model
        self.rank: int | None = None  # None: a spare, started ahead, waiting for a role
        if rank is not None:
            self.become(rank, step=step, seed=seed, init=init)

    def become(self, rank: int, *, step: int = 0, seed: int | None = None, init: StageInit | None = None) -> int:
        """Take the role of process ``rank`` at ``step``: what the constructor does, for a spare
        process started ahead of a failure (so the failure does not wait for a process start)."""
        if self.rank is not None:
            raise RuntimeError(f"this process already is rank {self.rank}")
        cfg, model, self.rank = self.cfg, self.model, rank
        self.num_stages, self.replicas = model.num_stages, cfg.replicas
        self.index, self.replica_index = stage_of(rank, self.num_stages)
        self.world = self.num_stages * self.replicas
        self.first, self.last = self.index == 0, self.index == self.num_stages - 1
        if init is not None and init.how == "random":
            seed = init.seed
        self.stage = model.build_stage(self.index, seed=cfg.seed if seed is None else seed)
        self.opt, self.sched = model.build_optimizer(self.stage, step=step)
        self.step = step
        self.grad_norm = 0.0
        self.replica: dict[str, torch.Tensor] | None = None  # a neighbour's edge layers (CheckFree+)
        self.solo: Any = None
        self.dp_group: Any = None
        self.init_seconds = 0.0  # how long fetching and loading ``init``'s state took
        if init is not None:
            t0 = time.perf_counter()
            self._init_from(init)
            self.init_seconds = time.perf_counter() - t0
        return os.getpid()

    def _init_from(self, init: StageInit) -> None:
        """Fetch the state ``init`` names from the processes that hold it, and take it."""
        fetched = ray.get(list(init.sources)) if init.sources else []
        if init.how == "replica":
            self._load_full(fetched[0])
            return
        keys = list(self.stage.state_dict())
        if init.how == "average":
            rule = NeighborAverage(NeighborAverageConfig(norm=self.cfg.norm, lr_scale=self.cfg.lr_scale))
            state = rule.rebuild(fetched[0], fetched[1], prev_grad_norm=init.grad_norms[0],
                                 next_grad_norm=init.grad_norms[1], keys=keys)
            self.stage.load_state_dict(state)
        elif init.how == "copy":
            edge = ray.get(init.edge) if init.edge is not None else None
            self.stage.load_state_dict(copy_from_neighbor(fetched[0], edge_replica=edge, keys=keys))
        prepare_rebuilt_optimizer(self.opt, self.sched, lr_scale=self.cfg.lr_scale)

    def _load_full(self, state: dict[str, Any]) -> None:
        self.stage.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optim"])
        self.sched.load_state_dict(state["sched"])
        self.step, self.grad_norm, self.replica = state["step"], state["grad_norm"], state["replica"]

    def pid(self) -> int:
        return os.getpid()

    def init_time(self) -> float:
        return self.init_seconds

    def join(self, host: str, port: int, generation: int) -> None:
        """Join the process group of this generation (a fresh one after every recovery)."""
        if host in ("127.0.0.1", "localhost") and Path("/sys/class/net/lo").exists():
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        timeout = datetime.timedelta(seconds=self.cfg.pg_timeout_s)
        store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=dist.PrefixStore(f"gen{generation}", store), rank=self.rank,
                                world_size=self.world, timeout=timeout)
        # Every rank creates every group, in the same order: one per process (its checkpoints),
        # one per stage (its replicas' gradient average).
        self.solo = [dist.new_group([r], timeout=timeout) for r in range(self.world)][self.rank]
        if self.replicas > 1:
            groups = [dist.new_group([rank_of(s, r, self.num_stages) for r in range(self.replicas)], timeout=timeout)
                      for s in range(self.num_stages)]
            self.dp_group = groups[self.index]

    def leave(self) -> int:
        """Leave the process group; a step cut short by a lost peer is dropped (no update applied)."""
        self._drop_groups()
        self.opt.zero_grad(set_to_none=True)
        return self.step

    def _drop_groups(self) -> None:
        self.solo = self.dp_group = None  # the last references: the groups' connections close with them
        if dist.is_initialized():
            dist.destroy_process_group()

    def _peer(self, stage: int) -> int:
        return rank_of(stage, self.replica_index, self.num_stages)

    def _run(self, parts: tuple[str, ...], h: torch.Tensor) -> torch.Tensor:
        if parts == stage_parts(self.index, self.num_stages):
            return self.stage(h)
        model: Any = self.model  # a SwappablePipelineModel: RayPipeline checked it for swap=True
        for part in parts:
            h = {EMBED: model.embed, BLOCKS: model.blocks, HEAD: model.head}[part](self.stage, h)
        return h

    def _micro_batches(self, step: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """This replica's share of ``step``'s batch, cut into micro-batches."""
        n, r = self.model.micro_batches, self.replicas
        x, y = self.model.batch(step)
        if len(x) % (n * r):
            raise ValueError(f"a batch of {len(x)} does not split into {r} replica(s) x {n} equal micro-batches")
        x, y = x.chunk(r)[self.replica_index], y.chunk(r)[self.replica_index]
        return x.chunk(n), y.chunk(n)

    def _shape(self) -> tuple[int, ...]:
        shape = tuple(self.model.activation_shape)
        if shape[0] % self.replicas:
            raise ValueError(f"a micro-batch of {shape[0]} does not split into {self.replicas} replicas")
        return (shape[0] // self.replicas, *shape[1:])

    def train_step(self, step: int) -> dict[str, float]:
        """One GPipe step: all micro-batches forward, then backward; average the replicas'
        gradients; clip; agree; update. A failed step (a peer lost) closes this process's
        connections at once, so that peers waiting on it fail too instead of waiting out the
        timeout; the driver then re-forms the group."""
        try:
            return self._train_step(step)
        except Exception:
            self._drop_groups()
            raise

    def _train_step(self, step: int) -> dict[str, float]:
        if step != self.step:
            raise RuntimeError(f"stage {self.index} is at step {self.step}, asked for step {step}")
        n, shape = self.model.micro_batches, self._shape()
        xs = ys = ()
        if self.first or self.last:
            xs, ys = self._micro_batches(step)
        routes = [route(self.num_stages, m, swap=self.cfg.swap) for m in range(n)]
        saved: list[tuple[int, int, torch.Tensor | None, torch.Tensor]] = []
        loss_sum = 0.0
        for m, hops in enumerate(routes):
            for k, (s, parts) in enumerate(hops):
                if s != self.index:
                    continue
                if k == 0:
                    h_in, out = None, self._run(parts, xs[m])
                else:
                    h_in = torch.empty(shape)
                    dist.recv(h_in, src=self._peer(hops[k - 1][0]))
                    h_in.requires_grad_()
                    out = self._run(parts, h_in)
                if k == len(hops) - 1:
                    loss = self.model.loss(out, ys[m])
                    loss_sum += loss.item() / n
                    out = loss / n
                else:
                    dist.send(out.detach(), dst=self._peer(hops[k + 1][0]))
                saved.append((m, k, h_in, out))
        for m, k, h_in, out in reversed(saved):
            hops = routes[m]
            if k == len(hops) - 1:
                out.backward()
            else:
                g = torch.empty(shape)
                dist.recv(g, src=self._peer(hops[k + 1][0]))
                out.backward(g)
            if h_in is not None:
                dist.send(h_in.grad, dst=self._peer(hops[k - 1][0]))
        if self.dp_group is not None:
            self._average_gradients()
        raw = float(torch.nn.utils.clip_grad_norm_(self.stage.parameters(), self.model.grad_clip))
        # Every process has its gradients: agree on it (and share the loss) before anyone
        # updates, so a process lost during the step leaves every survivor at the same step.
        agreed = torch.tensor([loss_sum])
        dist.all_reduce(agreed)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.grad_norm = min(raw, self.model.grad_clip)
        self.step = step + 1
        return {"step": step, "loss": float(agreed) / self.replicas, "grad_norm": self.grad_norm, "raw_grad_norm": raw}

    def _average_gradients(self) -> None:
        """The mean of the stage's replicas' gradients, in one all-reduce; every replica gets the
        same bits, so replicas stay identical."""
        params = [p for p in self.stage.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, group=self.dp_group)
        flat /= self.replicas
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """The mean loss of ``batches`` through the pipeline in fixed order, no update (replica 0's
        processes only). Inputs are read on the first stage, targets on the last."""
        losses = []
        for x, y in batches:
            shape = (x.shape[0], *tuple(self.model.activation_shape)[1:])
            if self.first:
                h = x
            else:
                h = torch.empty(shape)
                dist.recv(h, src=self._peer(self.index - 1))
            out = self.stage(h)
            if self.last:
                losses.append(float(self.model.loss(out, y)))
            else:
                dist.send(out, dst=self._peer(self.index + 1))
        return sum(losses) / len(losses) if losses else float("nan")

    def snapshot(self) -> dict[str, Any]:
        return {"model": stage_state(self.stage), "optim": optimizer_state(self.opt), "grad_norm": self.grad_norm,
                "step": self.step, "lrs": [g["lr"] for g in self.opt.param_groups]}

    def model_state(self) -> dict[str, torch.Tensor]:
        return stage_state(self.stage)

    def share_state(self, full: bool = False) -> Any:
        """A reference to this stage's weights (``full``: also optimizer, schedule, step and the
        edge replica it holds: all a replacement replica needs), put in the object store by this
        process, for a new process to fetch itself."""
        if not full:
            return ray.put(stage_state(self.stage))
        return ray.put({"model": stage_state(self.stage), "optim": self.opt.state_dict(),
                        "sched": self.sched.state_dict(), "step": self.step, "grad_norm": self.grad_norm,
                        "replica": self.replica})

    def share_edge_layers(self) -> Any:
        return ray.put(self.model.edge_layers(self.stage))

    def edge_layers(self) -> dict[str, torch.Tensor]:
        return self.model.edge_layers(self.stage)

    def hold_replica(self, layers: list[Any]) -> None:
        """Keep a neighbour's edge layers: ``layers`` is ``[ref]``, fetched here from their holder."""
        self.replica = ray.get(layers[0])

    def held_replica(self) -> dict[str, torch.Tensor] | None:
        return self.replica

    def share_replica(self) -> Any:
        return None if self.replica is None else ray.put(self.replica)

    def _ckpt_state(self) -> dict[str, Any]:
        return {"model": self.stage.state_dict(), "optim": ckpt.OptimizerState(self.stage, self.opt).state_dict()}

    def save(self, url: str) -> int:
        """Write this stage's checkpoint (replica 0 writes; the replicas are identical)."""
        if self.replica_index == 0:
            ckpt.save(self._ckpt_state(), url, step=self.step, process_group=self.solo, io_threads=2)
        return self.step

    def load(self, url: str, step: int) -> int:
        """Roll this stage back to checkpoint ``step`` of its run (model, optimizer, schedule)."""
        state = self._ckpt_state()
        ckpt.load(state, url, step=step, process_group=self.solo, io_threads=2)
        self.stage.load_state_dict(state["model"])
        ckpt.OptimizerState(self.stage, self.opt).load_state_dict(state["optim"])
        restore_schedule_base(self.opt, self.sched)  # (a rebuild since the checkpoint scaled it)
        self.model.set_schedule_step(self.sched, step)
        self.step = step
        return step
