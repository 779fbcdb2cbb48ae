"""CUDA paths: pinned slabs, the side stream ordered after the compute stream. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ckpt
from tests.helpers import bits_equal

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_lazy_snapshot_on_cuda_sees_queued_kernels_and_not_later_ones(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(64, 512, device="cuda")
    with ckpt.Checkpointer(tmp_path, every_n_steps=1, keep_last=None) as ck:
        ck.attach(opt)
        for step in range(3):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            # Queue more work on the compute stream right before save: the copy must wait for it.
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.0001)
            expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            handle = ck.save(step, {"model": model, "optim": opt})
            model(x).square().mean().backward()  # the next forward/backward overlaps the copy
            handle.staged.result(timeout=60)
        ck.wait()
        assert ck.pool is not None and ck.pool.pin_memory
    out = {k: torch.zeros_like(v) for k, v in expected.items()}
    ckpt.load({"model": out}, tmp_path, step=2, strict=False)
    for k, v in expected.items():
        assert bits_equal(out[k], v), k
