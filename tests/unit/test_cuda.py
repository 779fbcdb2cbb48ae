"""CUDA paths: pinned slabs, the side stream ordered after the compute stream, source tensors kept
alive until copied, the agent's segments registered with ``cudaHostRegister``, restore host →
device. Skipped without a GPU; ``benchmarks/gpu/run.sh`` runs them on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import ckpt
from ckpt import pinning
from tests.helpers import bits_equal, local_agent, save_as_writers

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)).cuda()


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _cpu_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    names = {p: n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim/{names[p]}/{k}"] = v.detach().cpu().clone()
    return out


def _busy(n: int = 30) -> None:
    """Queue long work on the compute stream, so that a copy not ordered after it would race it."""
    a = torch.randn(4096, 4096, device="cuda")
    for _ in range(n):
        a = torch.tanh(a @ a)


def test_lazy_snapshot_on_cuda_sees_queued_kernels_and_not_later_ones(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(64, 512, device="cuda")
    with ckpt.Checkpointer(tmp_path, every_n_steps=1, keep_last=None) as ck:
        ck.attach(opt)
        for step in range(3):
            _train_step(model, opt, x)
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


def test_sources_are_kept_alive_until_copied(tmp_path):
    """The snapshot holds every source tensor until its copy ran: optimizer state replaced (and
    its memory handed to new tensors by the caching allocator) right after ``save`` must not
    leak into the checkpoint."""
    model = _model(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(64, 512, device="cuda")
    _train_step(model, opt, x)
    expected = _cpu_state(model, opt)
    with ckpt.Checkpointer(tmp_path, every_n_steps=1, keep_last=None) as ck:
        ck.attach(opt)
        _busy()  # the copy waits for this, so the swap below happens before the copy runs
        handle = ck.save(0, {"model": model, "optim": opt})
        shapes = []
        for st in opt.state.values():
            for k in ("exp_avg", "exp_avg_sq"):
                shapes.append(st[k].shape)
                st[k] = torch.full_like(st[k], 7.0)  # drops the last reference the training loop had
        junk = [torch.full(s, 3.0, device="cuda") for s in shapes for _ in range(2)]  # reuse freed blocks
        handle.staged.result(timeout=120)
        ck.wait()
        del junk
    names = {p: n for n, p in model.named_parameters()}
    out_model = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    ckpt.load({"model": out_model}, tmp_path, step=0, strict=False)
    for k, v in out_model.items():
        assert bits_equal(v.cpu(), expected[f"model/{k}"]), k
    restored = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)).cuda()
    ropt = torch.optim.AdamW(restored.parameters(), lr=1e-2)
    with ckpt.Checkpointer(tmp_path, keep_last=None) as ck:
        assert ck.restore({"model": restored, "optim": ropt}) == 1
    rnames = {p: n for n, p in restored.named_parameters()}
    for p, st in ropt.state.items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert bits_equal(st[k].cpu(), expected[f"optim/{rnames[p]}/{k}"]), (rnames[p], k)
    assert set(rnames.values()) == set(names.values())


def test_restore_into_cuda_model_and_optimizer_is_bit_exact(tmp_path):
    model = _model(2).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    with ckpt.Checkpointer(tmp_path, every_n_steps=1, keep_last=2) as ck:
        ck.attach(opt)
        for step in range(3):
            _train_step(model, opt, x)
            ck.save(step, {"model": model, "optim": opt})
        ck.wait()
    expected = _cpu_state(model, opt)
    fresh = _model(3).to(torch.bfloat16)
    fopt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    with ckpt.Checkpointer(tmp_path) as ck:
        assert ck.restore({"model": fresh, "optim": fopt}) == 3
    got = _cpu_state(fresh, fopt)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert bits_equal(got[k], v), k
    assert all(p.device.type == "cuda" for p in fresh.parameters())
    assert all(v.device.type == "cuda" for st in fopt.state.values() for k, v in st.items() if k != "step")


def test_resharded_load_into_cuda_tensors(tmp_path):
    """Saved by 3 writers in chunks, loaded whole into CUDA tensors (bf16, fp32, int64)."""
    full = {"w": torch.randn(96, 40, dtype=torch.bfloat16), "b": torch.randn(96), "i": torch.arange(96 * 3).view(96, 3)}
    states = [{k: ckpt.Sharded(v.chunk(3, dim=0)[r].clone(), dim=0, rank=r, world=3) for k, v in full.items()}
              for r in range(3)]
    save_as_writers(states, str(tmp_path), step=5, max_chunk_bytes=1024)
    out = {k: torch.zeros_like(v, device="cuda") for k, v in full.items()}
    assert ckpt.load(out, str(tmp_path)) == 5
    for k, v in full.items():
        assert out[k].device.type == "cuda"
        assert bits_equal(out[k].cpu(), v), k


def test_agent_segments_are_registered_and_serve_restore(tmp_path):
    """Through a node agent the slabs are the agent's shared-memory segments, registered with
    ``cudaHostRegister`` (pinned for the copy engine); the restore reads them back to the GPU."""
    model = _model(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(64, 512, device="cuda")
    run = tmp_path / "run"
    shm_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else None  # tmpfs: segments can be pinned
    with local_agent(tmp_path, "cudatest", memory_budget_bytes=256 << 20, shm_root=shm_root):
        addr = f"unix://{tmp_path / 'a.sock'}"
        with ckpt.Checkpointer(str(run), agent=addr, every_n_steps=1, keep_last=2) as ck:
            ck.attach(opt)
            for step in range(2):
                _train_step(model, opt, x)
                ck.save(step, {"model": model, "optim": opt})
            ck.wait()
            mapped, pinned = ck.sink.allocator.segments()
            assert mapped >= 1 and pinned == mapped, (mapped, pinned)
            assert ck.pool is not None and ck.pool.pin_memory
        expected = _cpu_state(model, opt)
        fresh = _model(5)
        fopt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        with ckpt.Checkpointer(str(run), agent=addr) as ck:
            assert ck.restore({"model": fresh, "optim": fopt}) == 2
    got = _cpu_state(fresh, fopt)
    for k, v in expected.items():
        assert bits_equal(got[k], v), k
    # The second Checkpointer (and this one) closed: nothing stays registered, so the same
    # addresses can be pinned again (a leaked registration makes this fail "already registered").
    buf = torch.empty(64 << 20, dtype=torch.uint8)
    assert pinning.register(buf.data_ptr(), buf.numel())
    pinning.unregister(buf.data_ptr())


def test_a_failed_registration_does_not_poison_the_next_kernel(caplog):
    """cudaHostRegister that fails (here: the range is registered already) leaves a CUDA error
    behind; torch's next launch check must not see it."""
    buf = torch.empty(8 << 20, dtype=torch.uint8)
    assert pinning.register(buf.data_ptr(), buf.numel())
    try:
        assert not pinning.register(buf.data_ptr(), buf.numel())
        assert "cudaHostRegister" in caplog.text
        y = torch.nn.functional.gelu(torch.ones(1024, device="cuda"))
        torch.cuda.synchronize()
        assert float(y.sum()) > 0
    finally:
        pinning.unregister(buf.data_ptr())
    z = torch.ones(16, device="cuda") * 2
    assert float(z.sum()) == 32.0


def test_segments_held_by_the_agent_are_unregistered_at_close(tmp_path):
    """The agent keeps the newest committed snapshot after the trainer's session ends; the
    trainer's own mapping of it is unregistered and dropped at close, not leaked."""
    model = _model(6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(64, 512, device="cuda")
    shm_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with local_agent(tmp_path, "cudaclose", memory_budget_bytes=256 << 20, shm_root=shm_root):
        addr = f"unix://{tmp_path / 'a.sock'}"
        for _ in range(3):  # each round maps, pins and must release the same amount again
            ck = ckpt.Checkpointer(str(tmp_path / "run"), agent=addr, every_n_steps=1, keep_last=1)
            ck.attach(opt)
            _train_step(model, opt, x)
            ck.save(0, {"model": model, "optim": opt}, force=True)
            ck.wait()
            allocator = ck.sink.allocator
            assert allocator.segments()[0] >= 1
            ck.close()
            assert allocator.segments() == (0, 0)
            _train_step(model, opt, x)  # the GPU is fine after the segments went
