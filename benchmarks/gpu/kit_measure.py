"""The GPU kit's measurements other than the training loop: the job, copy bandwidths, staging
and restore (see ``bench_gpu.py``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import bench_engine
import torch
from kit_report import GB, _median


def _fs_type(path: str) -> str:
    from ckpt.storage.local import fs_type

    return fs_type(path) or "unknown"


def _disk_free(path: str) -> int:
    try:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize
    except OSError:
        return 0


class Job:
    """The model, optimizer and data, and one training step with gradient accumulation."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        bench_engine.shape_model(args)
        self.model = bench_engine.build_model(args).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.gen = torch.Generator(device=device).manual_seed(args.seed)
        self.accum = 1
        self.autocast = device.type == "cuda"

    def micro(self) -> torch.Tensor:
        a = self.args
        idx = torch.randint(0, a.vocab, (a.micro_batch, a.seq + 1), device=self.device, generator=self.gen)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(idx[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
        (loss / self.accum).backward()
        return loss.detach()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def calibrate(self, target_s: float) -> float:
        for _ in range(2):
            self.micro()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(3):
            self.micro()
        self.sync()
        per = (time.perf_counter() - t0) / 3
        self.opt.zero_grad(set_to_none=True)
        self.accum = max(1, min(self.args.max_micro_batches, round(target_s / per)))
        return per

    def forward_backward(self) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for _ in range(self.accum):
            total += self.micro()
        return total / self.accum

    def state(self) -> dict[str, Any]:
        return {"model": self.model, "optim": self.opt}

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and the optimizer's per-parameter tensors, by name (not the scalar
        ``step``, whose device a loader may change)."""
        out = {f"model/{n}": p.detach() for n, p in self.model.named_parameters()}
        names = {p: n for n, p in self.model.named_parameters()}
        for p, st in self.opt.state.items():
            for k, v in st.items():
                if k != "step" and isinstance(v, torch.Tensor):
                    out[f"optim/{names[p]}/{k}"] = v
        return out

    def tensors(self) -> list[torch.Tensor]:
        return list(self.named_tensors().values())

    def clone(self) -> dict[str, torch.Tensor]:
        return {k: t.clone() for k, t in self.named_tensors().items()}

    def wipe(self) -> None:
        with torch.no_grad():
            for t in self.tensors():
                t.zero_()

    def equal(self, expected: dict[str, torch.Tensor]) -> bool:
        got = self.named_tensors()
        return got.keys() == expected.keys() and all(torch.equal(got[k], e.to(got[k].device)) for k, e in expected.items())

    def put(self, expected: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, t in self.named_tensors().items():
                t.copy_(expected[k])


# ---------------------------------------------------------------------------------------------
# Sections


def bandwidth(job: Job, reps: int) -> dict[str, Any]:
    cuda = job.device.type == "cuda"
    tensors = job.tensors()
    sizes = [t.numel() * t.element_size() for t in tensors]
    total = sum(sizes)
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=cuda)
    views, off = [], 0
    for t, n in zip(tensors, sizes):
        views.append(pinned[off:off + n].view(t.dtype).view(t.shape))
        off += n
    stream = torch.cuda.Stream() if cuda else None

    def timed(fn: Callable[[], None]) -> float:
        times = []
        for _ in range(reps + 1):
            job.sync()
            t0 = time.perf_counter()
            fn()
            job.sync()
            times.append(time.perf_counter() - t0)
        return total / GB / statistics.median(times[1:])

    def per_tensor() -> None:
        if stream is None:
            for src, dst in zip(tensors, views):
                dst.copy_(src)
            return
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for src, dst in zip(tensors, views):
                dst.copy_(src, non_blocking=True)
        stream.synchronize()

    flat = torch.empty(total, dtype=torch.uint8, device=job.device)
    pageable = torch.empty(total, dtype=torch.uint8)
    out = {"bytes": total, "tensors": len(tensors),
           "d2h_pinned_per_tensor": timed(per_tensor),
           "d2h_pinned_one_buffer": timed(lambda: pinned.copy_(flat, non_blocking=cuda)),
           "d2h_pageable_one_buffer": timed(lambda: pageable.copy_(flat)),
           "h2d_pinned_one_buffer": timed(lambda: flat.copy_(pinned, non_blocking=cuda))}
    out["pinned"] = bool(cuda and pinned.is_pinned())
    # On the CPU (the dry run) nothing is registered, but the same code runs: CI proves it.
    out["registered"] = _registered_copies(flat, total, timed)
    return out


def _registered_copies(flat: torch.Tensor, total: int, timed: Callable[[Callable[[], None]], float]) -> dict[str, Any]:
    """Device -> host into memory pinned with ``cudaHostRegister`` (as the agent's segments are),
    by kind of mapping: a tmpfs file (the agent's), anonymous memory, and each with transparent
    huge pages asked for, to tell the page size from the file mapping as the cause of a slow copy."""
    import mmap

    from agent.shm import map_file
    from ckpt import pinning

    out: dict[str, Any] = {}
    for knob in ("enabled", "shmem_enabled"):
        with contextlib.suppress(OSError), open(f"/sys/kernel/mm/transparent_hugepage/{knob}") as f:
            out[f"thp_{knob}"] = f.read().strip()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and _disk_free("/dev/shm") > 2 * total else None
    for name, huge in (("shm_file", False), ("shm_file_huge", True), ("anon", False), ("anon_huge", True)):
        if name.startswith("shm") and shm is None:
            continue
        path = None
        try:
            if name.startswith("shm"):
                path = os.path.join(shm, f"ckpt-gpu-kit-reg-{os.getpid()}")
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                os.posix_fallocate(fd, 0, total)
                os.close(fd)
                mm, buf = map_file(path, total, writable=True)
            else:
                mm = mmap.mmap(-1, total)
                buf = torch.frombuffer(mm, dtype=torch.uint8)
            if huge and hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_HUGEPAGE)
            buf.fill_(0)  # fault the pages in (as a leased slab is by the time it is staged into)
            ptr = buf.data_ptr()
            ok = pinning.register(ptr, total)
            try:
                out[name] = {"gbps": timed(lambda dst=buf: dst.copy_(flat, non_blocking=True)), "registered": ok}
            finally:
                if ok:
                    pinning.unregister(ptr)
                del buf, mm  # unmapped with the last reference (agent.shm.map_file)
        except Exception as e:  # noqa: BLE001 - a diagnostic; the section goes on
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)
    return out


def staging(job: Job, ckpt: Any, run: str, reps: int, agent: str | None) -> dict[str, Any]:
    """save() until staged, nothing else running; the first save (plan, pool) is not timed."""
    opts: dict[str, Any] = {"every_n_steps": 1, "keep_last": 1}
    if agent:
        opts["agent"] = agent
    calls, staged, nbytes = [], [], 0
    out: dict[str, Any] = {}
    with ckpt.Checkpointer(run, **opts) as ck:
        ck.attach(job.opt)
        for i in range(reps + 1):
            job.sync()
            t0 = time.perf_counter()
            h = ck.save(i, job.state(), force=True)
            t_call = time.perf_counter() - t0
            h.staged.result()
            t_staged = time.perf_counter() - t0
            h.committed.result()
            nbytes = h.nbytes
            if i:
                calls.append(t_call)
                staged.append(t_staged)
        if agent:
            mapped, pinned = ck.sink.allocator.segments()
            out["segments"], out["segments_pinned"] = mapped, pinned
        out["pool_pinned"] = bool(ck.pool is not None and ck.pool.pin_memory)
    copy = [s - c for s, c in zip(staged, calls)]
    # gbps: the device->host copy after save() returned (what overlaps forward/backward);
    # with_call_gbps: from the start of save() (its call is also counted as stall in the loop).
    out.update(bytes=nbytes, call_s=_median(calls), staged_s=_median(staged), copy_s=_median(copy),
               gbps=nbytes / GB / _median(copy), with_call_gbps=nbytes / GB / _median(staged))
    return out


def restore(job: Job, ckpt: Any, root: str, agent: str | None, out: dict[str, Any]) -> None:
    """Fills ``out`` reader by reader (what ran is kept if a later one fails)."""
    job.sync()
    expected = job.clone()
    nbytes = sum(t.numel() * t.element_size() for t in expected.values())

    def timed(name: str, fn: Callable[[], Any]) -> None:
        job.wipe()
        job.sync()
        t0 = time.perf_counter()
        try:
            inner = fn()
            job.sync()
            dt = time.perf_counter() - t0
            out[name] = {"s": dt, "gbps": nbytes / GB / dt, "bit_exact": job.equal(expected)}
            if inner is not None:  # the restore call alone, without opening and closing the Checkpointer
                out[name].update(restore_s=inner, restore_gbps=nbytes / GB / inner)
        except Exception as e:  # noqa: BLE001 - one reader failing does not hide the others
            out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        job.put(expected)  # back to the expected state for the next reader

    run = os.path.join(root, "restore-ckpt")
    with ckpt.Checkpointer(run, keep_last=1) as ck:
        ck.save(1, job.state(), force=True)
        ck.wait()
    def from_storage() -> float:
        with ckpt.Checkpointer(run) as ck:
            t0 = time.perf_counter()
            ck.restore(job.state())
            job.sync()
            return time.perf_counter() - t0

    timed("ckpt_storage", from_storage)
    if agent:
        arun = os.path.join(root, "restore-agent")
        with ckpt.Checkpointer(arun, agent=agent, keep_last=1) as ck:
            ck.save(1, job.state(), force=True)
            ck.wait()

        def from_agent() -> float:
            with ckpt.Checkpointer(arun, agent=agent) as ck:
                t0 = time.perf_counter()
                ck.restore(job.state())
                job.sync()
                return time.perf_counter() - t0

        timed("ckpt_agent_memory", from_agent)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    drun = os.path.join(root, "restore-dcp")
    msd, osd = get_state_dict(job.model, job.opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=drun)

    def dcp_load() -> None:
        msd, osd = get_state_dict(job.model, job.opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=drun)
        set_state_dict(job.model, job.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

    timed("dcp_load", dcp_load)
    tpath = os.path.join(root, "restore.pt")
    torch.save({"model": job.model.state_dict(), "optim": job.opt.state_dict()}, tpath)

    def torch_load() -> None:
        sd = torch.load(tpath, map_location=job.device, weights_only=True)  # step tensors land there too
        job.model.load_state_dict(sd["model"])
        job.opt.load_state_dict(sd["optim"])

    timed("torch_load", torch_load)
    for p in (run, drun, tpath, os.path.join(root, "restore-agent")):
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (os.path.exists(p) and os.remove(p))
