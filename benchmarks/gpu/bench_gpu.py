#!/usr/bin/env python
"""The GPU kit's measurements: what checkpointing a GPU training loop costs, side by side.

One process, one GPT-style model on the GPU (``--params-m`` million parameters, AdamW; fp32
weights, bf16 autocast; random tokens from a seeded generator, nothing downloaded), trained with
gradient accumulation so that one optimizer step takes about ``--target-step-s`` (real jobs take
seconds per step; the figures mean little for a step of a few milliseconds). Sections, in order,
each written to ``$OUT/gpu_bench.json`` and ``$OUT/gpu_bench.md`` as soon as it ends:

1. ``env``: GPU, torch, CUDA, host memory, where storage and agent memory live (tmpfs or disk).
2. ``bandwidth``: the limits. A bare device→host ``copy_`` of every state tensor into pinned
   memory on a side stream (what staging does, without the engine), one contiguous buffer the
   same size, the same into pageable memory, and host→device from pinned memory.
3. ``staging``: the engine's staging throughput, nothing else running: ``Checkpointer.save``
   until the ``staged`` future resolves, in-process (pinned pool) and through a node agent
   (its shared-memory segments registered with ``cudaHostRegister``), against the bare copy.
4. ``loop_every10`` / ``loop_every1``: the training loop with each method checkpointing every
   10 steps / every step: ``none``, ``ckpt`` (``Checkpointer`` + ``attach``), ``ckpt_agent``
   (the same through a ``ckpt-agent`` process), ``dcp_async`` (``async_save``, default stager:
   staging blocks the caller), ``dcp_async_pinned`` (``async_save`` with DCP's ``DefaultStager``:
   pinned memory, staging in the background; the loop waits for staging before the next
   ``optimizer.step()``, as DCP requires), ``torch_save``. Per method: mean step time and its
   overhead against ``none``, stall per checkpoint (the time the loop waited: the save call,
   waits before the optimizer step, waits for the previous save), save→durable latency.
   Every method first takes untimed checkpoints in the warm-up (pinned pools and plans are
   allocated once in a real job). Retention keeps two checkpoints for every method.
5. ``restore``: a forced checkpoint, the live state wiped, then restored host→device and
   compared bit for bit: ``Checkpointer.restore`` from storage, from agent memory, ``dcp.load``,
   ``torch.load(map_location=device)``.

``--cpu``: the same steps on the CPU with a tiny model (a dry run: proves the kit works; its
figures are not GPU figures). ``--budget-s``: a section that would start past the budget is
skipped and marked so; what ran is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [REPO, os.path.dirname(HERE)]

import bench_engine
import torch
from kit_measure import Job, _disk_free, _fs_type, bandwidth, restore, staging
from kit_report import GB, Report, _fmt, _median, markdown, method_options, targets

METHODS = ("none", "ckpt", "ckpt_agent", "dcp_async", "dcp_async_pinned", "torch_save")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The report: JSON + Markdown, rewritten after every section


class Method:
    """One way of checkpointing, driven by the loop: ``before_step`` (waits before
    optimizer.step), ``save``, ``finish``; each returns the seconds the loop waited."""

    def __init__(self, name: str, job: Job, run: str, ctx: dict[str, Any]) -> None:
        self.name, self.job, self.run, self.ctx = name, job, run, ctx
        self.durable: list[float] = []
        self.pending: list[Any] = []
        self.saved: list[str] = []
        self.ck = None
        self.stager = None
        self.staging_wait: Any = None
        base, variant = method_options(name)  # (ckpt:when_busy=skip: a variant of ckpt)
        if base in ("ckpt", "ckpt_agent"):
            opts: dict[str, Any] = {"every_n_steps": 1, "keep_last": 2, **variant}
            if base == "ckpt_agent":
                opts["agent"] = ctx["agent"]
            self.ck = ctx["ckpt"].Checkpointer(run, **opts)
            self.ck.attach(job.opt)
        elif name == "dcp_async_pinned":
            self.stager = self._new_stager()
        self.stagers = 1

    def _new_stager(self) -> Any:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        cuda = self.job.device.type == "cuda"
        return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                            use_async_staging=True, use_non_blocking_copy=cuda))

    def _retire(self, path: str) -> None:
        self.saved.append(path)
        while len(self.saved) > 2:  # keep two, like the others; removed in the background
            old = self.saved.pop(0)
            threading.Thread(target=shutil.rmtree, args=(old, True), daemon=True).start()

    def before_step(self) -> float:
        if self.staging_wait is None:
            return 0.0
        t0 = time.perf_counter()
        self.staging_wait.result()
        self.staging_wait = None
        return time.perf_counter() - t0

    def save(self, step: int) -> float:
        """The seconds the loop waited in the save call itself (the Checkpointer's pre-step
        waits are read from its status)."""
        job = self.job
        t0 = time.perf_counter()
        if self.ck is not None:
            h = self.ck.save(step, job.state(), force=True)
            if h is not None and not h.skipped:
                h.persisted.add_done_callback(lambda f, s=t0: self.durable.append(time.perf_counter() - s))
            return time.perf_counter() - t0
        if self.name == "torch_save":
            path = os.path.join(self.run, f"step_{step}.pt")
            with open(path, "wb") as f:
                torch.save({"model": job.model.state_dict(), "optim": job.opt.state_dict(), "step": step}, f)
                f.flush()
                os.fsync(f.fileno())
            self.durable.append(time.perf_counter() - t0)
            self._retire(path)
            return time.perf_counter() - t0
        if self.name in ("dcp_async", "dcp_async_pinned"):
            from torch.distributed.checkpoint.state_dict import get_state_dict
            from torch.distributed.checkpoint.state_dict_saver import async_save

            for prev in self.pending:  # DCP: one save in flight; wait for the previous
                prev.result()
            self.pending.clear()
            path = os.path.join(self.run, f"step_{step}")
            msd, osd = get_state_dict(job.model, job.opt)
            sd = {"model": msd, "optim": osd}
            if self.stager is None:
                fut = async_save(sd, checkpoint_id=path)
            else:
                if not getattr(getattr(self.stager, "_state_dict_stager", None), "_deepcopy_dispatch", True):
                    # Older torch closes a caller's stager after its upload: it cannot be reused.
                    self.stager = self._new_stager()
                    self.stagers += 1
                resp = async_save(sd, checkpoint_id=path, async_stager=self.stager)
                if hasattr(resp, "upload_completion"):  # staging in the background
                    fut, self.staging_wait = resp.upload_completion, resp.staging_completion
                else:
                    fut = resp
            fut.add_done_callback(lambda f, s=t0: self.durable.append(time.perf_counter() - s))
            self.pending.append(fut)
            self._retire(path)
            return time.perf_counter() - t0
        return 0.0

    def finish(self) -> float:
        t0 = time.perf_counter()
        if self.ck is not None:
            self.ck.wait()
        for f in self.pending:
            f.result()
        self.before_step()
        return time.perf_counter() - t0

    def close(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.ck is not None:
            st = self.ck.status()
            out["rows"] = [r for r in st.checkpoints]
            out["failed"], out["skipped"] = st.failed, st.skipped
            out["errors"] = list(st.errors)
            self.ck.close()
        if self.stager is not None:
            self.stager.close()
            out["stagers"] = self.stagers
        return out


def loop(job: Job, method: str, every: int, steps: int, warm: int, run: str, ctx: dict[str, Any]) -> dict[str, Any]:
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run, exist_ok=True)
    m = Method(method, job, run, ctx)
    step_times, stalls = [], []
    phases: dict[str, list[float]] = {}
    ckpt_steps: list[int] = []
    try:
        for step in range(1, warm + steps + 1):
            timed = step > warm
            # Untimed checkpoints in the warm-up: pools and plans are allocated once per job (two
            # slabs: a node agent keeps the newest committed snapshot while the next is staged).
            take = method != "none" and ((timed and step % every == 0) or step <= min(2, warm))
            t0 = time.perf_counter()
            job.forward_backward()
            t1, waited = time.perf_counter(), m.before_step()
            job.opt.step()
            job.opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            # The loop reads its loss every step (logging), which waits for the compute stream only.
            if job.device.type == "cuda":
                torch.cuda.current_stream().synchronize()
            t3 = time.perf_counter()
            if take:
                waited += m.save(step)
            if timed:
                step_times.append(time.perf_counter() - t0)
                for k, v in (("launch_fb", t1 - t0), ("opt", t2 - t1), ("gpu_wait", t3 - t2), ("save", t0 + step_times[-1] - t3)):
                    phases.setdefault(k, []).append(v)  # where a step's time goes (docs/gpu.md)
                if take:
                    ckpt_steps.append(step)
                    stalls.append(waited)
                elif stalls and waited:
                    stalls[-1] += waited  # DCP's staging wait belongs to the checkpoint before it
        drain = m.finish()
    finally:
        closed = m.close()
    out: dict[str, Any] = {"steps": len(step_times), "checkpoints": len(ckpt_steps), "mean_step_s": statistics.fmean(step_times),
                           "median_step_s": statistics.median(step_times), "drain_s": drain,
                           "durable_median_s": _median(m.durable[1:] if len(m.durable) > 1 else m.durable)}
    if m.ck is not None:
        rows = {r["step"]: r for r in closed["rows"]}
        stalls = [rows[s]["stall_s"] + rows[s]["hook_stall_s"] for s in ckpt_steps if s in rows]
        out["failed"], out["skipped"], out["errors"] = closed["failed"], closed["skipped"], closed["errors"][:3]
    if "stagers" in closed:
        out["dcp_stagers_made"] = closed["stagers"]
    out["stalls_s"] = stalls
    out["phases_median_s"] = {k: statistics.median(v) for k, v in phases.items()}
    out["stall_median_s"] = _median(stalls)
    shutil.rmtree(run, ignore_errors=True)
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="dry run on the CPU with a tiny model")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-kit-out", help="directory for gpu_bench.json/.md")
    p.add_argument("--storage", help="where checkpoints go (default: /dev/shm when it has room, else a temp dir)")
    p.add_argument("--budget-s", type=float, default=360.0, help="sections that would start later are skipped")
    p.add_argument("--params-m", type=float, default=300.0, help="model size in millions of parameters")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--target-step-s", type=float, default=0.5, help="gradient accumulation up to this step time")
    p.add_argument("--max-micro-batches", type=int, default=32)
    p.add_argument("--steps-every10", type=int, default=20)
    p.add_argument("--steps-every1", type=int, default=5)
    p.add_argument("--warm", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--methods-every1", help="methods of the every-step loop (default: --methods)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sections", help="run only these, comma-separated (default: all; see docs/gpu.md)")
    a = p.parse_args(argv)
    if a.cpu:
        a.params_m, a.d_model, a.vocab, a.seq, a.micro_batch = 1.0, 64, 512, 32, 2
        a.target_step_s, a.steps_every10, a.steps_every1, a.warm, a.reps = 0.0, 10, 3, 1, 1
    a.methods_every1 = a.methods_every1 or a.methods
    unknown = {method_options(m)[0] for m in f"{a.methods},{a.methods_every1}".split(",")} - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t_start = time.monotonic()
    report = Report(args.out, t_start + args.budget_s, set(args.sections.split(",")) if args.sections else None)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for a dry run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    import ckpt

    job = Job(args, device)
    per_micro = job.calibrate(args.target_step_s)
    for _ in range(2):  # Adam state exists from here on
        job.forward_backward()
        job.opt.step()
        job.opt.zero_grad(set_to_none=True)
    job.sync()
    t0 = time.perf_counter()
    job.forward_backward()
    job.opt.step()
    job.opt.zero_grad(set_to_none=True)
    job.sync()
    step_s = time.perf_counter() - t0
    state_bytes = sum(t.numel() * t.element_size() for t in job.tensors())

    # Agent memory and storage in tmpfs when it has room (the engine is measured, not a disk);
    # a segment or file that outgrows a full tmpfs would kill the process with SIGBUS.
    shm = "/dev/shm"
    shm_room = _disk_free(shm) if os.path.isdir(shm) else 0
    agent_budget = int(3 * state_bytes + (256 << 20))
    agent_shm = shm if shm_room > agent_budget + state_bytes else tempfile.mkdtemp(prefix="ckpt-gpu-agent-shm-")
    in_shm = shm_room - (agent_budget if agent_shm == shm else 0) > 10 * state_bytes
    root = args.storage or (os.path.join(shm, f"ckpt-gpu-kit-{os.getpid()}") if in_shm
                            else tempfile.mkdtemp(prefix="ckpt-gpu-kit-"))
    os.makedirs(root, exist_ok=True)
    agent_root = tempfile.mkdtemp(prefix="ckpt-gpu-agent-")
    ctx: dict[str, Any] = {"ckpt": ckpt, "agent": None}
    agent_proc = None
    with report.section("env", 0) as env:
        assert env is not None
        env.update(cpu=args.cpu, torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                   device_name=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                   cpus=os.cpu_count(), params_m=round(sum(p.numel() for p in job.model.parameters()) / 1e6, 1),
                   layers=args.layers, d_model=args.d_model, vocab=args.vocab, seq=args.seq, micro_batch=args.micro_batch,
                   micro_batches=job.accum, micro_s=per_micro, step_s=step_s, state_gb=state_bytes / GB,
                   state_tensors=len(job.tensors()), storage=root, storage_fs=_fs_type(root), shm_free_gb=shm_room / GB,
                   agent_fs=_fs_type(agent_shm), host_mem_gb=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB)
        if device.type == "cuda":
            env["gpu_mem_gb"] = torch.cuda.get_device_properties(0).total_memory / GB
    try:
        # One agent process for the staging, loop and restore sections (as on a real node).
        ctx["agent"], agent_proc = bench_engine._start_agent(agent_root, agent_budget, shm_dir=agent_shm)
        with report.section("bandwidth", 10 + 4 * state_bytes / GB) as body:
            if body is not None:
                body.update(bandwidth(job, args.reps))
        bare = (report.data.get("bandwidth") or {}).get("d2h_pinned_per_tensor")
        with report.section("staging", 10 + 4 * state_bytes / GB) as body:
            if body is not None:
                for name, agent in (("ckpt", None), ("ckpt_agent", ctx["agent"])):
                    try:
                        body[name] = staging(job, ckpt, os.path.join(root, f"staging-{name}"), args.reps, agent)
                        if bare:
                            body[name]["vs_pinned_copy"] = body[name]["gbps"] / bare
                    finally:
                        shutil.rmtree(os.path.join(root, f"staging-{name}"), ignore_errors=True)
        methods = args.methods.split(",")
        if "dcp_async" in methods or "dcp_async_pinned" in methods:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        plan = [("loop_every10", 10, args.steps_every10), ("restore", 0, 0), ("loop_every1", 1, args.steps_every1)]
        for name, every, steps in plan:
            if name == "restore":
                with report.section("restore", 20 + 8 * state_bytes / GB) as body:
                    if body is not None:
                        restore(job, ckpt, root, ctx["agent"], body)
                continue
            names = methods if every != 1 else args.methods_every1.split(",")
            need = len(names) * (args.warm + steps) * step_s * 1.5 + 10
            with report.section(name, need) as body:
                if body is None:
                    continue
                for method in names:
                    if time.monotonic() > report.deadline:
                        body[method] = {"error": "skipped: budget used up"}
                        continue
                    try:
                        body[method] = loop(job, method, every, steps, args.warm, os.path.join(root, f"{method}-{every}"), ctx)
                    except Exception as e:  # noqa: BLE001 - recorded; the next method still runs
                        body[method] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                        print(f"  {method}: FAILED {e}\n{traceback.format_exc()}", flush=True)
                    else:
                        r = body[method]
                        print(f"  {method}: step {r['mean_step_s']:.4f} s, stall {_fmt(r['stall_median_s'], '.4f')} s, "
                              f"durable {_fmt(r['durable_median_s'], '.2f')} s", flush=True)
                    report.write()
                base = (body.get("none") or {}).get("mean_step_s")
                ours = (body.get("ckpt") or {}).get("stall_median_s")
                for r in body.values():
                    if isinstance(r, dict) and "mean_step_s" in r:
                        if base:
                            r["overhead_pct"] = 100 * (r["mean_step_s"] / base - 1)
                        if ours and r.get("stall_median_s") is not None:
                            r["stall_x_ckpt"] = r["stall_median_s"] / ours
    finally:
        if agent_proc is not None:
            bench_engine._stop_agent(agent_proc)
        shutil.rmtree(agent_root, ignore_errors=True)
        if agent_shm != shm:
            shutil.rmtree(agent_shm, ignore_errors=True)
        if not args.storage:
            shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    report.data["targets"] = targets(report.data)
    report.data["total_s"] = time.monotonic() - t_start
    report.write()
    print(markdown(report.data), flush=True)
    failed = [k for k, v in report.data["sections"].items() if v.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
