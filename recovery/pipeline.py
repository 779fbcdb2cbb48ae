"""Pipeline-parallel training of a small LLaMA-style model, with stage failures and recovery.

The model (byte-level tokens, RMSNorm, rotary positions, SwiGLU MLP) is cut into stages of
equally many blocks; the first stage also holds the token embedding, the last the final norm
and output layer. Blocks are named locally (``blocks.0`` in every stage), so neighbouring
stages' state dicts line up for :class:`recovery.checkfree.NeighborAverage`.

Training text is the Python standard library's own sources (nothing is downloaded); each
step's batch is a pure function of the step number, so a run that rolls back redoes exactly
the same batches.

:class:`RayPipeline` runs every stage in its own Ray actor process; stages exchange
activations and gradients with ``torch.distributed`` send/recv over gloo (GPipe schedule).
A stage is lost by killing its process; the driver rebuilds it with a policy
(``neighbor_average``, ``copy``, ``random``, ``reload``) and the process group is re-formed
with the survivors, who keep their live weights and optimizer state.
"""

from __future__ import annotations

import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    vocab_size: int = 256  # bytes
    dim: int = 128
    heads: int = 4
    num_stages: int = 4
    blocks_per_stage: int = 2
    seq_len: int = 64
    mlp_hidden: int = 0  # 0: SwiGLU's usual 8/3 * dim, rounded up to a multiple of 16
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"dim ({self.dim}) must split into heads ({self.heads}) of even size")
        if self.num_stages < 1 or self.blocks_per_stage < 1:
            raise ValueError("num_stages and blocks_per_stage must be >= 1")
        if self.seq_len < 2 or self.vocab_size < 2:
            raise ValueError("seq_len and vocab_size must be >= 2")

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 16 * math.ceil(8 * self.dim / 3 / 16)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotary(seq_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    return ang.cos(), ang.sin()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.attn_norm = RMSNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.mlp_norm = RMSNorm(cfg.dim)
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.dim, bias=False)
        cos, sin = _rotary(cfg.seq_len, cfg.dim // cfg.heads)
        # Derived, not learned: kept out of the state dict so they are never averaged or saved.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        cos, sin = self.cos[:t], self.sin[:t]
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Stage(nn.Module):
    """One pipeline stage: [embedding] + blocks + [final norm, output layer]."""

    def __init__(self, cfg: ModelConfig, index: int, *, seed: int = 0) -> None:
        super().__init__()
        if not 0 <= index < cfg.num_stages:
            raise ValueError(f"stage index {index} is not in 0..{cfg.num_stages - 1}")
        self.cfg, self.index = cfg, index
        self.first, self.last = index == 0, index == cfg.num_stages - 1
        if self.first:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks_per_stage))
        if self.last:
            self.norm = RMSNorm(cfg.dim)
            self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        """GPT-2 style init from a seed of its own (per stage), so stages start different."""
        g = torch.Generator().manual_seed(seed * 1000 + self.index)
        depth = self.cfg.num_stages * self.cfg.blocks_per_stage
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    std = self.cfg.init_std / math.sqrt(2 * depth) if name.endswith(("proj.weight", "down.weight")) else self.cfg.init_std
                    p.copy_(torch.randn(p.shape, generator=g) * std)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            h = b(h)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.run_blocks(self.embed_tokens(x) if self.first else x)
        return self.logits(h) if self.last else h

    def edge_layers(self) -> dict[str, torch.Tensor]:
        """The layers only an edge stage has, which CheckFree+ replicates on its neighbour."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("blocks.")}


def build_stages(cfg: ModelConfig, *, seed: int = 0) -> list[Stage]:
    return [Stage(cfg, i, seed=seed) for i in range(cfg.num_stages)]


# ---------------------------------------------------------------------------------------------
# Training text


def stdlib_corpus(max_bytes: int = 4 << 20) -> torch.Tensor:
    """Bytes of the Python standard library's ``.py`` sources (sorted paths, so deterministic)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            out += path.read_bytes() + b"\n"
        except OSError:
            continue
        if len(out) >= max_bytes:
            break
    if len(out) < 1 << 16:
        raise RuntimeError(f"found only {len(out)} bytes of Python sources under {root}; is the standard library installed?")
    return torch.frombuffer(out[:max_bytes], dtype=torch.uint8).long()


@dataclass(frozen=True, slots=True)
class TextData:
    """Train/validation split of a byte corpus; batches are pure functions of (seed, step)."""

    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_stdlib(cls, max_bytes: int = 4 << 20, val_fraction: float = 0.05) -> TextData:
        data = stdlib_corpus(max_bytes)
        n = int(len(data) * (1 - val_fraction))
        return cls(data[:n], data[n:])

    def batch(self, step: int, batch_size: int, seq_len: int, *, seed: int = 0, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        src = self.train if split == "train" else self.val
        g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (1 << 62))
        starts = torch.randint(0, len(src) - seq_len - 1, (batch_size,), generator=g)
        idx = starts[:, None] + torch.arange(seq_len + 1)
        chunk = src[idx]
        return chunk[:, :-1], chunk[:, 1:]


# ---------------------------------------------------------------------------------------------
# Optimizer, schedule


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    total_steps: int = 1000
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 16
    micro_batches: int = 2
    data_seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batches ({self.micro_batches})")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError("total_steps must be >= 1 and warmup_steps >= 0")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def build_optimizer(stage: nn.Module, cfg: TrainConfig, *, step: int = 0) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on norms and the embedding) and a warmup+cosine schedule positioned at ``step``."""
    decay = [p for n, p in stage.named_parameters() if p.dim() >= 2 and not n.startswith("embed.")]
    no_decay = [p for n, p in stage.named_parameters() if not (p.dim() >= 2 and not n.startswith("embed."))]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    _advance(sched, step)
    return opt, sched


def _advance(sched: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    sched.last_epoch = step
    for g, base in zip(sched.optimizer.param_groups, sched.base_lrs):
        g["lr"] = base * sched.lr_lambdas[0](step)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


def _stage_threads() -> None:
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


def stage_state(stage: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in stage.state_dict().items()}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A deep copy of an optimizer's state dict (tensors cloned), for comparisons."""
    sd = optimizer.state_dict()
    return {
        "state": {k: {n: (t.detach().clone() if isinstance(t, torch.Tensor) else t) for n, t in v.items()} for k, v in sd["state"].items()},
        "param_groups": [dict(g) for g in sd["param_groups"]],
    }


# ---------------------------------------------------------------------------------------------
# Stages as Ray actors


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineConfig:
    """A pipeline-parallel run on Ray: one actor process per stage."""

    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    seed: int = 0
    corpus_bytes: int = 1 << 20
    checkpoint_url: str | None = None  # with checkpoint_every: what the reload policy rolls back to
    checkpoint_every: int = 0
    replicate_every: int = 1  # CheckFree+: edge layers copied to the neighbouring stage every N steps
    lr_scale: float = 1.1
    norm: str = "l2"
    actor_num_cpus: float = 0.25
    pg_timeout_s: float = 60.0
    step_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.checkpoint_every and not self.checkpoint_url:
            raise ValueError("checkpoint_every needs checkpoint_url")
        if self.replicate_every < 0 or self.checkpoint_every < 0:
            raise ValueError("replicate_every and checkpoint_every must be >= 0")


class StageWorker:
    """One stage in its own process (a Ray actor): model, optimizer, schedule, and its peers over gloo."""

    def __init__(self, cfg: PipelineConfig, index: int, *, step: int = 0, seed: int | None = None,
                 state: dict[str, torch.Tensor] | None = None, rebuilt: bool = False) -> None:
        from recovery.checkfree import prepare_rebuilt_optimizer

        _stage_threads()
        self.cfg, self.index = cfg, index
        self.stage = Stage(cfg.model, index, seed=cfg.seed if seed is None else seed)
        if state is not None:
            self.stage.load_state_dict(state)
        self.opt, self.sched = build_optimizer(self.stage, cfg.train, step=step)
        if rebuilt:
            prepare_rebuilt_optimizer(self.opt, self.sched, lr_scale=cfg.lr_scale)
        self.step = step
        self.grad_norm = 0.0
        self.replica: dict[str, torch.Tensor] | None = None  # a neighbour's edge layers (CheckFree+)
        self.data = TextData.from_stdlib(cfg.corpus_bytes) if index in (0, cfg.model.num_stages - 1) else None
        self.solo: Any = None

    def pid(self) -> int:
        return os.getpid()

    def join(self, host: str, port: int, generation: int) -> None:
        """Join the stages' process group of this generation (a fresh one after every recovery)."""
        import datetime

        import torch.distributed as dist

        if host in ("127.0.0.1", "localhost") and Path("/sys/class/net/lo").exists():
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        world = self.cfg.model.num_stages
        store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=self.cfg.pg_timeout_s))
        dist.init_process_group("gloo", store=dist.PrefixStore(f"gen{generation}", store), rank=self.index,
                                world_size=world, timeout=datetime.timedelta(seconds=self.cfg.pg_timeout_s))
        # One group per stage, for checkpoints of that stage alone (every rank creates every group).
        self.solo = [dist.new_group([r]) for r in range(world)][self.index]

    def leave(self) -> int:
        """Leave the process group; a step cut short by a lost peer is dropped (no update applied)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.solo = None
        self.opt.zero_grad(set_to_none=True)
        return self.step

    def train_step(self, step: int) -> dict[str, float]:
        """One GPipe step: all micro-batches forward, then backward; clip; agree; update."""
        import torch.distributed as dist

        if step != self.step:
            raise RuntimeError(f"stage {self.index} is at step {self.step}, asked for step {step}")
        m_cfg, t_cfg = self.cfg.model, self.cfg.train
        first, last = self.stage.first, self.stage.last
        mb = t_cfg.batch_size // t_cfg.micro_batches
        shape = (mb, m_cfg.seq_len, m_cfg.dim)
        if self.data is not None:
            x, y = self.data.batch(step, t_cfg.batch_size, m_cfg.seq_len, seed=t_cfg.data_seed)
        saved: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        loss_sum = 0.0
        for m in range(t_cfg.micro_batches):
            if first:
                h_in = None
                h = self.stage.embed_tokens(x[m * mb:(m + 1) * mb])
            else:
                h_in = torch.empty(shape)
                dist.recv(h_in, src=self.index - 1)
                h_in.requires_grad_()
                h = h_in
            out = self.stage.run_blocks(h)
            if last:
                logits = self.stage.logits(out)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[m * mb:(m + 1) * mb].reshape(-1))
                loss_sum += loss.item() / t_cfg.micro_batches
                out = loss / t_cfg.micro_batches
            else:
                dist.send(out.detach(), dst=self.index + 1)
            saved.append((h_in, out))
        for h_in, out in reversed(saved):
            if last:
                out.backward()
            else:
                g = torch.empty(shape)
                dist.recv(g, src=self.index + 1)
                out.backward(g)
            if h_in is not None:
                dist.send(h_in.grad, dst=self.index - 1)
        raw = float(torch.nn.utils.clip_grad_norm_(self.stage.parameters(), t_cfg.grad_clip))
        # Every stage has its gradients: agree on it (and share the loss) before anyone updates,
        # so a stage lost during the step leaves every survivor at the same step.
        agreed = torch.tensor([loss_sum])
        dist.all_reduce(agreed)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.grad_norm = min(raw, t_cfg.grad_clip)
        self.step = step + 1
        return {"step": step, "loss": float(agreed), "grad_norm": self.grad_norm, "raw_grad_norm": raw}

    def snapshot(self) -> dict[str, Any]:
        return {"model": stage_state(self.stage), "optim": optimizer_state(self.opt), "grad_norm": self.grad_norm,
                "step": self.step, "lrs": [g["lr"] for g in self.opt.param_groups]}

    def model_state(self) -> dict[str, torch.Tensor]:
        return stage_state(self.stage)

    def edge_layers(self) -> dict[str, torch.Tensor]:
        return self.stage.edge_layers()

    def hold_replica(self, layers: dict[str, torch.Tensor], step: int) -> None:
        self.replica = layers
        self.replica_step = step

    def held_replica(self) -> dict[str, torch.Tensor] | None:
        return self.replica

    def _ckpt_state(self) -> dict[str, Any]:
        import ckpt

        return {"model": self.stage.state_dict(), "optim": ckpt.OptimizerState(self.stage, self.opt).state_dict()}

    def save(self, url: str) -> int:
        import ckpt

        ckpt.save(self._ckpt_state(), url, step=self.step, process_group=self.solo, io_threads=2)
        return self.step

    def load(self, url: str, step: int) -> int:
        """Roll this stage back to checkpoint ``step`` of its run (model, optimizer, schedule)."""
        import ckpt

        state = self._ckpt_state()
        ckpt.load(state, url, step=step, process_group=self.solo, io_threads=2)
        self.stage.load_state_dict(state["model"])
        ckpt.OptimizerState(self.stage, self.opt).load_state_dict(state["optim"])
        _advance(self.sched, step)
        self.step = step
        return step


class StageLostError(RuntimeError):
    """Stages of the pipeline died; ``stages`` says which. Call :meth:`RayPipeline.recover`."""

    def __init__(self, stages: list[int], step: int) -> None:
        super().__init__(f"stage(s) {stages} lost during step {step}; recover them with RayPipeline.recover")
        self.stages, self.step = stages, step


POLICIES = ("neighbor_average", "copy", "random", "reload", "auto")


class RayPipeline:
    """Drive a pipeline of :class:`StageWorker` actors: train, lose stages, recover them.

    Needs ``ray.init()`` first. Recovery policies: ``neighbor_average`` (CheckFree; CheckFree+
    copy for the first/last stage), ``copy`` (copy one neighbour), ``random`` (fresh init),
    ``reload`` (every stage back to the newest checkpoint) and ``auto`` (reload or neighbour
    average, by :func:`recovery.checkfree.decide_auto`). ``events`` records each recovery.
    """

    def __init__(self, cfg: PipelineConfig, *, events: Any = None) -> None:
        import ray
        import torch.distributed as dist

        from recovery.checkfree import LossBumpTracker
        from recovery.events import EventLog

        self.cfg = cfg
        # Printed as it happens, like recovery.run's; pass EventLog(echo=None) for silence.
        self.event_log = events if events is not None else EventLog()
        self._ray = ray
        self._actor_cls = ray.remote(num_cpus=cfg.actor_num_cpus, max_restarts=0)(StageWorker)
        self.host = "127.0.0.1" if _single_node(ray) else ray.util.get_node_ip_address()
        self._store = dist.TCPStore(self.host, 0, is_master=True, wait_for_workers=False)
        self.generation = 0
        self.step = 0
        self.events: list[dict[str, Any]] = []
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: int | None = None
        self.tracker = LossBumpTracker()
        self._step_seconds: list[float] = []
        self.workers = [self._new_worker(i) for i in range(cfg.model.num_stages)]
        self._join_all()

    # -- plumbing ---------------------------------------------------------------------------
    def _new_worker(self, index: int, **kw: Any) -> Any:
        return self._actor_cls.remote(self.cfg, index, step=kw.pop("step", self.step), **kw)

    def _join_all(self) -> None:
        self.generation += 1
        port = self._store.port
        # New actors first start (a process that imports torch) so that none waits out the
        # rendezvous timeout on a slow peer.
        self._ray.get([w.pid.remote() for w in self.workers], timeout=self.cfg.step_timeout_s)
        # Includes starting new actors (a Python process that imports torch): allow the step timeout.
        self._ray.get([w.join.remote(self.host, port, self.generation) for w in self.workers], timeout=self.cfg.step_timeout_s)

    def pids(self) -> list[int]:
        return self._ray.get([w.pid.remote() for w in self.workers])

    def snapshot(self, index: int) -> dict[str, Any]:
        return self._ray.get(self.workers[index].snapshot.remote())

    def kill_stage(self, index: int) -> int:
        """Lose a stage the hard way: SIGKILL its process (between steps). Returns the pid killed."""
        import signal

        pid = self._ray.get(self.workers[index].pid.remote())
        os.kill(pid, signal.SIGKILL)
        return pid

    def _checkpoint_url(self, index: int) -> str:
        return f"{self.cfg.checkpoint_url.rstrip('/')}/stage{index}"

    # -- training ---------------------------------------------------------------------------
    def train(self, steps: int) -> list[dict[str, float]]:
        """Run ``steps`` steps; raises :class:`StageLostError` when a stage dies."""
        import time

        ray = self._ray
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            futures = [w.train_step.remote(self.step) for w in self.workers]
            results, lost = [], []
            for i, f in enumerate(futures):
                try:
                    results.append(ray.get(f, timeout=self.cfg.step_timeout_s))
                except ray.exceptions.RayActorError:
                    lost.append(i)
                except ray.exceptions.RayTaskError:
                    pass  # a survivor whose peer died mid-step: it drops the step on recovery
            if lost or len(results) < len(self.workers):
                if not lost:
                    lost = self._dead_stages()
                raise StageLostError(lost, self.step)
            self.step += 1
            self._step_seconds.append(time.perf_counter() - t0)
            rec = {"step": self.step - 1, "loss": results[-1]["loss"], "grad_norms": [r["grad_norm"] for r in results]}
            self.history.append(rec)
            self.tracker.observe(rec["loss"])
            out.append(rec)
            self._after_step()
        return out

    def _dead_stages(self) -> list[int]:
        dead = []
        for i, w in enumerate(self.workers):
            try:
                self._ray.get(w.pid.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - any failure to answer means lost
                dead.append(i)
        return dead

    def _after_step(self) -> None:
        ray, n = self._ray, self.cfg.model.num_stages
        if self.cfg.replicate_every and self.step % self.cfg.replicate_every == 0 and n >= 2:
            pairs = [(0, 1), (n - 1, n - 2)] if n > 2 else [(0, 1), (1, 0)]
            ray.get([self.workers[dst].hold_replica.remote(self.workers[src].edge_layers.remote(), self.step) for src, dst in pairs])
        if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
            ray.get([w.save.remote(self._checkpoint_url(i)) for i, w in enumerate(self.workers)])
            self.last_checkpoint = self.step

    # -- recovery ---------------------------------------------------------------------------
    # -- the job control a recovery policy drives (recovery.policy.JobControl's pipeline verbs) --
    def log(self, kind: str, message: str, **fields: Any) -> None:
        self.event_log.emit(kind, message, **fields)

    def run(self, steps: int, policy: Any = "neighbor_average", *, max_failures: int = 3,
            before_step: Any = None) -> list[dict[str, float]]:
        """Train until ``self.step == steps``, recovering every lost stage with ``policy`` (a
        name or a :class:`recovery.checkfree.StageRecoveryPolicy`), at most ``max_failures``
        times. ``before_step(pipeline, step)`` runs before each step (fault injection)."""
        import time

        from recovery import events as ev
        from recovery.checkfree import stage_policy
        from recovery.detect import WORKER_DIED, Failure
        from recovery.errors import RecoveryError, TooManyFailuresError
        from recovery.policy import ABORT

        the_policy = stage_policy(policy)
        self.log(ev.STARTED, f"pipeline of {len(self.workers)} stages, policy {the_policy.name}, "
                 f"from step {self.step} to {steps}", stages=len(self.workers), policy=the_policy.name)
        out: list[dict[str, float]] = []
        failures = 0
        while self.step < steps:
            if before_step is not None:
                before_step(self, self.step)
            try:
                out += self.train(1)
            except StageLostError as e:
                failures += 1
                failure = Failure(WORKER_DIED, failures, f"stage(s) {e.stages} lost at step {e.step}", time.time(),
                                  ranks=tuple(e.stages), last_step=e.step)
                self.log(ev.FAILURE, f"{failure.kind}: {failure.detail}", failure=failure.kind, stages=list(e.stages),
                         step=e.step)
                if failures > max_failures:
                    self.log(ev.ABORTED, f"giving up after {failures} failures (max_failures={max_failures})")
                    raise TooManyFailuresError(f"{failures} failures, max_failures={max_failures}") from e
                outcome = the_policy.on_failure(failure, self)
                if outcome.action == ABORT:
                    self.log(ev.ABORTED, outcome.detail)
                    raise RecoveryError(outcome.detail) from e
        self.log(ev.FINISHED, f"step {self.step} reached after {failures} failure(s)", failures=failures)
        return out

    def recover_stages(self, lost: list[int], policy: Any) -> dict[str, Any]:
        """The verb :meth:`recovery.checkfree.StageRecoveryPolicy.on_failure` calls."""
        return self.recover(lost, policy)

    def recover(self, lost: list[int], policy: Any = "neighbor_average") -> dict[str, Any]:
        """Replace the lost stages' actors and re-form the process group; returns the event recorded.
        ``policy``: one of :data:`POLICIES` or a :class:`recovery.checkfree.StageRecoveryPolicy`."""
        import time

        from recovery import checkfree as cf
        from recovery import events as ev

        if not isinstance(policy, cf.StageRecoveryPolicy) and policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        the_policy = cf.stage_policy(policy)
        policy = the_policy.strategy
        ray, n = self._ray, self.cfg.model.num_stages
        t0 = time.perf_counter()
        survivors = [i for i in range(n) if i not in lost]
        steps = set(ray.get([self.workers[i].leave.remote() for i in survivors]))
        if len(steps) > 1:
            raise RuntimeError(f"survivors disagree on the step ({sorted(steps)}); reload instead")
        self.step = steps.pop() if steps else self.step
        plans = cf.plan_recovery({i: 1 for i in lost}, num_stages=n)
        event: dict[str, Any] = {"step": self.step, "lost": list(lost), "policy": policy, "plans": [p.to_dict() for p in plans]}
        mean_step = sum(self._step_seconds[-20:]) / max(1, len(self._step_seconds[-20:])) or 1e-3
        inputs = cf.AutoInputs(
            step_seconds=mean_step,
            steps_since_snapshot=None if self.last_checkpoint is None else self.step - self.last_checkpoint,
            recovery_steps=self.tracker.recovery_steps)
        chosen, event["reason"] = the_policy.choose(plans, inputs)
        if chosen == "reload" and self.last_checkpoint is None:
            forced = [p.reason for p in plans if p.action is cf.RecoveryAction.RELOAD]
            raise RuntimeError(f"cannot rebuild {lost}: {forced or 'reload asked for'}, and there is no checkpoint "
                               "to reload (set checkpoint_every)")
        event["chosen"] = chosen
        self.log(ev.RESTORE_PLAN, f"stage(s) {list(lost)} at step {self.step}: {event['reason']}", **event)
        loss_before = self.history[-1]["loss"] if self.history else None
        if chosen == "reload":
            if self.last_checkpoint is None:
                raise RuntimeError("reload asked for but no checkpoint was taken (set checkpoint_every)")
            for s in lost:
                self.workers[s] = self._new_worker(s, step=self.last_checkpoint)
            self._join_all()
            ray.get([w.load.remote(self._checkpoint_url(i), self.last_checkpoint) for i, w in enumerate(self.workers)])
            event["rolled_back_steps"] = self.step - self.last_checkpoint
            self.step = self.last_checkpoint
        else:
            rule = cf.NeighborAverage(cf.NeighborAverageConfig(norm=self.cfg.norm, lr_scale=self.cfg.lr_scale))
            grad_norms = self.history[-1]["grad_norms"] if self.history else [0.0] * n
            for p in plans:
                self.workers[p.stage] = self._rebuild(p, chosen, rule, grad_norms, event)
            if loss_before is not None:
                self.tracker.start(loss_before)
            self._join_all()
        event["seconds"] = time.perf_counter() - t0
        self.events.append(event)
        how = ", ".join(f"stage {k}: {v}" for k, v in event.get("how", {}).items())
        if chosen == "reload":
            self.log(ev.RESTORED, f"every stage reloaded step {self.step} ({event['rolled_back_steps']} step(s) rolled "
                     f"back) in {event['seconds']:.2f} s", **event)
        else:
            self.log(ev.RESTORED, f"{how}; survivors kept their weights, nothing rolled back; "
                     f"{event['seconds']:.2f} s", **event)
        return event

    def _rebuild(self, plan: Any, chosen: str, rule: Any, grad_norms: list[float], event: dict[str, Any]) -> Any:
        from recovery import checkfree as cf

        ray, s = self._ray, plan.stage
        keys = list(Stage(self.cfg.model, s).state_dict())
        if plan.action is cf.RecoveryAction.COPY_REPLICA:  # not reachable with one replica per stage
            raise NotImplementedError("data-parallel replicas are not part of this pipeline")
        if chosen == "random":
            event.setdefault("how", {})[s] = "random"
            return self._new_worker(s, seed=self.cfg.seed + 7919 * (self.step + 1), rebuilt=True)
        if plan.action is cf.RecoveryAction.COPY_NEIGHBOR or chosen == "copy":
            partner = plan.sources[0] if plan.action is cf.RecoveryAction.COPY_NEIGHBOR else s - 1
            neighbor = ray.get(self.workers[partner].model_state.remote())
            replica = ray.get(self.workers[partner].held_replica.remote()) if plan.action is cf.RecoveryAction.COPY_NEIGHBOR else None
            if plan.action is cf.RecoveryAction.COPY_NEIGHBOR and replica is None:
                raise RuntimeError(f"stage {partner} holds no replica of stage {s}'s edge layers (replicate_every=0?)")
            state = cf.copy_from_neighbor(neighbor, edge_replica=replica, keys=keys)
            event.setdefault("how", {})[s] = f"copy stage {partner}" + (" + edge replica" if replica else "")
        else:
            prev, nxt = ray.get([self.workers[s - 1].model_state.remote(), self.workers[s + 1].model_state.remote()])
            gp, gn = grad_norms[s - 1], grad_norms[s + 1]
            state = rule.rebuild(prev, nxt, prev_grad_norm=gp, next_grad_norm=gn, keys=keys)
            event.setdefault("how", {})[s] = "average"
            event.setdefault("weights", {})[s] = rule.weights(gp, gn)
        return self._new_worker(s, state=state, rebuilt=True)

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                self._ray.kill(w)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.workers = []


def _single_node(ray: Any) -> bool:
    try:
        return len([n for n in ray.nodes() if n.get("Alive")]) <= 1
    except Exception:  # noqa: BLE001
        return True
