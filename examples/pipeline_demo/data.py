"""Training text: the Python standard library's own sources (nothing is downloaded). Each
step's batch is a pure function of the step number, so a run that rolls back redoes exactly
the same batches."""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch


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
