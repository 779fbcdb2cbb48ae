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
