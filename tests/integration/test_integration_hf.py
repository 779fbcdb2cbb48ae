"""ckpt.integrations.hf under DDP: two processes (torchrun, gloo, loopback) train a Trainer with
CkptCallback and stop after step 4; two new processes resume from the checkpoint of step 3.
Every rank ends bit-identical to an uninterrupted two-process run (each rank gets its own RNG
state back, the data order of each rank's shard is the same)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

WORKER = Path(__file__).with_name("_hf_ddp_worker.py")
WORLD = 2


def _torchrun(phase: str, url: Path, out: Path, result: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        str(WORKER),
        phase,
        str(url),
        str(out),
        str(result),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow  # three torchrun launches of two processes: minutes on 2 shared cores
def test_ddp_trainer_resumes_bit_exactly(tmp_path):
    _torchrun("reference", tmp_path / "ref-run", tmp_path / "ref-out", tmp_path / "ref")
    _torchrun("first", tmp_path / "run", tmp_path / "out", tmp_path / "first")
    _torchrun("resume", tmp_path / "run", tmp_path / "out", tmp_path / "got")
    for rank in range(WORLD):
        ref = torch.load(tmp_path / f"ref.{rank}", weights_only=True)
        got = torch.load(tmp_path / f"got.{rank}", weights_only=True)
        assert got["resumed_from"] == str(tmp_path / "out" / "checkpoint-3")
        assert got["model"].keys() == ref["model"].keys()
        for name, t in ref["model"].items():
            assert torch.equal(got["model"][name], t), (rank, name)
        assert got["optim"].keys() == ref["optim"].keys()
        for pid, st in ref["optim"].items():
            for k, v in st.items():
                assert torch.equal(got["optim"][pid][k], v), (rank, pid, k)
        assert got["losses"] == ref["losses"]
