"""Recovery in place on a GPU: what a survivor and a warm standby do with CUDA, in the calls the
worker process makes (``recovery.worker_process``), without Ray (which the GPU kit does not
carry) and on one GPU (one NCCL rank: a lost peer cannot be shown; the integration tests show it
on gloo). Skipped without a GPU; ``benchmarks/gpu/run.sh`` runs them on a GPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ROOT = Path(__file__).resolve().parents[2]


def test_a_survivor_leaves_an_aborted_nccl_group_and_joins_the_next_with_its_cuda_state_intact():
    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    import torch.distributed.distributed_c10d as c10d

    from recovery.worker_process import Worker, _leave_group

    assert hasattr(c10d, "_abort_process_group"), "this torch cannot abort a group: a survivor would wait out its timeout"

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(64, 256, device="cuda")

    def train_step() -> None:
        model(x).square().mean().backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)  # a data-parallel step's collective, on the group of the moment
        opt.step()
        opt.zero_grad()

    store = dist.TCPStore("127.0.0.1", 0, 1, True)
    dist.init_process_group("nccl", store=dist.PrefixStore("attempt0", store), rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    train_step()
    torch.cuda.synchronize()
    kept = {n: (t.data_ptr(), t.detach().clone()) for n, t in model.state_dict().items()}
    moments = {id(p): opt.state[p]["exp_avg"].clone() for p in model.parameters()}

    # The survivor's stop in place: NCCL aborted (a collective waiting for a lost peer returns),
    # the broken group destroyed; the process, its CUDA context and its memory stay.
    survivor = Worker.__new__(Worker)  # (no warm-up thread: only the group calls are exercised)
    survivor._backend, survivor._group_fds = "nccl", set()
    survivor._cut_group()
    _leave_group()
    assert not dist.is_initialized()
    for n, t in model.state_dict().items():
        assert t.data_ptr() == kept[n][0] and torch.equal(t, kept[n][1]), n
    for p in model.parameters():
        assert torch.equal(opt.state[p]["exp_avg"], moments[id(p)])

    # The next attempt's group (a new generation on the same store), and training goes on.
    dist.init_process_group("nccl", store=dist.PrefixStore("attempt1", store), rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        t = torch.full((4,), 2.0, device="cuda")
        dist.all_reduce(t)
        assert t.tolist() == [2.0] * 4
        train_step()
        torch.cuda.synchronize()
        assert any(not torch.equal(t, kept[n][1]) for n, t in model.state_dict().items())
        assert all(t.is_cuda and t.data_ptr() == kept[n][0] for n, t in model.state_dict().items())
    finally:
        dist.destroy_process_group()


def test_a_standby_whose_cuda_fixed_its_devices_too_early_refuses_the_handover():
    # What a standby would do if its warm-up ran a backward before the handover: it sees no GPU
    # for good, and says so instead of training on the CPU or on the wrong GPU.
    script = textwrap.dedent("""
        import torch
        from recovery.worker_process import _take_devices
        w = torch.nn.Parameter(torch.zeros(4, 4))
        (torch.ones(2, 4) @ w).sum().backward()
        try:
            _take_devices(("0",))
        except RuntimeError as e:
            print("refused:", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0 and "refused: this worker sees 0 GPU(s)" in out.stdout, out.stdout + out.stderr


def _env(**more: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return dict(os.environ, PYTHONPATH=path, **more)


def test_a_warm_standby_takes_over_a_gpu_after_its_warm_up():
    # A standby holds no GPU of Ray's: its process starts with CUDA_VISIBLE_DEVICES="" (what Ray
    # gives an actor with num_gpus=0), warms up (imports, an optimizer, a backward), and takes the
    # lost rank's GPU only then. Were CUDA (even only its driver) initialised during the warm-up,
    # it would see no GPU after the handover.
    script = textwrap.dedent("""
        import os, torch
        from recovery.warmup import _gpus_may_come_later, warm_up
        from recovery.worker_process import _take_devices
        assert _gpus_may_come_later()
        warm_up()
        assert not torch.cuda.is_initialized(), "the warm-up initialised CUDA"
        _take_devices(("0",))
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1, torch.cuda.device_count()
        model = torch.nn.Linear(512, 512).cuda()
        model(torch.randn(8, 512, device="cuda")).sum().backward()
        torch.cuda.synchronize()
        print("standby on", torch.cuda.get_device_name(0))
    """)
    out = subprocess.run([sys.executable, "-c", script], env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "standby on" in out.stdout
