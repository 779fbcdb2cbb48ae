"""Writes the golden checkpoint of the current format version (run once per version; its
output is committed, one directory per version).

    python -m tests.golden.make_golden

The golden test loads it with the current code: a change that breaks reading old
checkpoints fails there. Never regenerate it to make that test pass; add a new version.
"""

from __future__ import annotations

from pathlib import Path

import torch

import ckpt
from ckpt import format as fmt

HERE = Path(__file__).parent
from ckpt.manifest import FORMAT_VERSION  # noqa: E402

RUNS = {1: HERE / "v1", 2: HERE / "v2", 3: HERE / "v3", 4: HERE / "v4"}
RUN = RUNS[FORMAT_VERSION]  # what the current writer produces


def golden_state_parts() -> tuple[dict, list[dict]]:
    """The global tensors, and the two writers' states that saved them."""
    full = {
        "w": torch.arange(35, dtype=torch.float32).reshape(7, 5) / 4,
        "bf16": (torch.arange(6, dtype=torch.float32) - 2.5).to(torch.bfloat16),
        "f8": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float8_e4m3fn),
        "i64": torch.tensor([-(2**40), 0, 2**40]),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "qkv": torch.arange(24, dtype=torch.float32).reshape(6, 4),  # parts (4, 1, 1)
    }
    q, k, v = full["qkv"].split([4, 1, 1])
    states = []
    for r in range(2):
        states.append({
            "model": {
                "w": ckpt.Sharded(full["w"].chunk(2)[r].clone() if r == 0 else torch.cat([full["w"].chunk(2)[1], torch.zeros(1, 5)]),
                                  dim=0, rank=r, world=2, logical_size=7),
                "bf16": full["bf16"], "f8": full["f8"], "i64": full["i64"], "flags": full["flags"],
                "scalar": full["scalar"],
                "qkv": ckpt.Sharded(torch.cat([q.chunk(2)[r], k if r == 0 else k[:0], v if r == 0 else v[:0]]),
                                    dim=0, rank=r, world=2, parts=(4, 1, 1)),
            },
            "step": 42,
            "loader": {"epoch": 1, "position": 100 + r},
            "cfg": {"betas": (0.9, 0.95), "name": "golden"},
        })
    return full, states


def main() -> None:
    if RUN.exists():
        raise SystemExit(f"{RUN} exists: a golden checkpoint is never rewritten; bump FORMAT_VERSION instead")
    _, states = golden_state_parts()
    st = ckpt.open_storage(str(RUN))
    writers = [fmt.writer_name(r) for r in range(2)]
    for r, state in enumerate(states):
        plan = ckpt.plan_save(state, rank=r, world=2, max_chunk_bytes=40)
        ckpt.write_plan(st, plan, step=42, writer=writers[r], save_id="golden")
    ckpt.commit(st, 42, writers, save_id="golden")
    print(f"wrote {RUN}")


if __name__ == "__main__":
    main()
