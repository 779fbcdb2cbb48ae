"""One pipeline stage in its own process (a Ray actor): its module, optimizer and schedule
built by the caller's :class:`PipelineModel`, and its peers over gloo.

A step is GPipe's: every micro-batch forward (activations received from the previous stage,
sent to the next), then every micro-batch backward (gradients the other way), gradient
clipping, and an all-reduce that every stage passes before any updates, so that a stage lost
during the step leaves every survivor at the same step.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import ckpt

from ..checkfree.rule import prepare_rebuilt_optimizer
from .spec import PipelineConfig, PipelineModel


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
    """Plain class; :class:`RayPipeline` wraps it with ``ray.remote``. ``state``: the stage's
    weights (a rebuilt stage); ``rebuilt``: a fresh optimizer with the boosted learning rate."""

    def __init__(self, cfg: PipelineConfig, model: PipelineModel, index: int, *, step: int = 0,
                 seed: int | None = None, state: dict[str, torch.Tensor] | None = None, rebuilt: bool = False) -> None:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.cfg, self.model, self.index = cfg, model, index
        self.world = model.num_stages
        self.first, self.last = index == 0, index == self.world - 1
        self.stage = model.build_stage(index, seed=cfg.seed if seed is None else seed)
        if state is not None:
            self.stage.load_state_dict(state)
        self.opt, self.sched = model.build_optimizer(self.stage, step=step)
        if rebuilt:
            prepare_rebuilt_optimizer(self.opt, self.sched, lr_scale=cfg.lr_scale)
        self.step = step
        self.grad_norm = 0.0
        self.replica: dict[str, torch.Tensor] | None = None  # a neighbour's edge layers (CheckFree+)
        self.solo: Any = None

    def pid(self) -> int:
        return os.getpid()

    def join(self, host: str, port: int, generation: int) -> None:
        """Join the stages' process group of this generation (a fresh one after every recovery)."""
        if host in ("127.0.0.1", "localhost") and Path("/sys/class/net/lo").exists():
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        timeout = datetime.timedelta(seconds=self.cfg.pg_timeout_s)
        store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=dist.PrefixStore(f"gen{generation}", store), rank=self.index,
                                world_size=self.world, timeout=timeout)
        # One group per stage, for checkpoints of that stage alone (every rank creates every group).
        self.solo = [dist.new_group([r]) for r in range(self.world)][self.index]

    def leave(self) -> int:
        """Leave the process group; a step cut short by a lost peer is dropped (no update applied)."""
        if dist.is_initialized():
            dist.destroy_process_group()
        self.solo = None
        self.opt.zero_grad(set_to_none=True)
        return self.step

    def train_step(self, step: int) -> dict[str, float]:
        """One GPipe step: all micro-batches forward, then backward; clip; agree; update."""
        if step != self.step:
            raise RuntimeError(f"stage {self.index} is at step {self.step}, asked for step {step}")
        model, n = self.model, self.model.micro_batches
        shape = model.activation_shape
        if self.first or self.last:
            x, y = model.batch(step)
            if len(x) % n:
                raise ValueError(f"a batch of {len(x)} does not split into {n} equal micro-batches")
            xs, ys = x.chunk(n), y.chunk(n)
        saved: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        loss_sum = 0.0
        for m in range(n):
            if self.first:
                h_in = None
                out = self.stage(xs[m])
            else:
                h_in = torch.empty(shape)
                dist.recv(h_in, src=self.index - 1)
                h_in.requires_grad_()
                out = self.stage(h_in)
            if self.last:
                loss = model.loss(out, ys[m])
                loss_sum += loss.item() / n
                out = loss / n
            else:
                dist.send(out.detach(), dst=self.index + 1)
            saved.append((h_in, out))
        for h_in, out in reversed(saved):
            if self.last:
                out.backward()
            else:
                g = torch.empty(shape)
                dist.recv(g, src=self.index + 1)
                out.backward(g)
            if h_in is not None:
                dist.send(h_in.grad, dst=self.index - 1)
        raw = float(torch.nn.utils.clip_grad_norm_(self.stage.parameters(), model.grad_clip))
        # Every stage has its gradients: agree on it (and share the loss) before anyone updates,
        # so a stage lost during the step leaves every survivor at the same step.
        agreed = torch.tensor([loss_sum])
        dist.all_reduce(agreed)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.grad_norm = min(raw, model.grad_clip)
        self.step = step + 1
        return {"step": step, "loss": float(agreed), "grad_norm": self.grad_norm, "raw_grad_norm": raw}

    def snapshot(self) -> dict[str, Any]:
        return {"model": stage_state(self.stage), "optim": optimizer_state(self.opt), "grad_norm": self.grad_norm,
                "step": self.step, "lrs": [g["lr"] for g in self.opt.param_groups]}

    def model_state(self) -> dict[str, torch.Tensor]:
        return stage_state(self.stage)

    def edge_layers(self) -> dict[str, torch.Tensor]:
        return self.model.edge_layers(self.stage)

    def hold_replica(self, layers: dict[str, torch.Tensor]) -> None:
        self.replica = layers

    def held_replica(self) -> dict[str, torch.Tensor] | None:
        return self.replica

    def _ckpt_state(self) -> dict[str, Any]:
        return {"model": self.stage.state_dict(), "optim": ckpt.OptimizerState(self.stage, self.opt).state_dict()}

    def save(self, url: str) -> int:
        ckpt.save(self._ckpt_state(), url, step=self.step, process_group=self.solo, io_threads=2)
        return self.step

    def load(self, url: str, step: int) -> int:
        """Roll this stage back to checkpoint ``step`` of its run (model, optimizer, schedule)."""
        state = self._ckpt_state()
        ckpt.load(state, url, step=step, process_group=self.solo, io_threads=2)
        self.stage.load_state_dict(state["model"])
        ckpt.OptimizerState(self.stage, self.opt).load_state_dict(state["optim"])
        self.model.set_schedule_step(self.sched, step)
        self.step = step
        return step
