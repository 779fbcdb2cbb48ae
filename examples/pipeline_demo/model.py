"""A small LLaMA-style model cut into pipeline stages.

Byte-level tokens, RMSNorm, rotary positions, SwiGLU MLP; the stages hold equally many
blocks, the first also the token embedding, the last the final norm and output layer. Blocks
are named locally (``blocks.0`` in every stage), so neighbouring stages' state dicts line up
for :class:`recovery.checkfree.NeighborAverage`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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
