#!/usr/bin/env python
"""What checkpointing costs a training loop: ckpt.Checkpointer against torch.save and DCP.

One run trains the same small decoder-only transformer on CPU (token + position embedding,
``N`` blocks of causal self-attention + MLP with pre-LayerNorm, LM head; AdamW; random tokens
from a seeded generator, nothing downloaded) for the same number of steps with each method, and
checkpoints model + optimizer every ``--every`` steps:

1. ``none``: no checkpointing (the baseline step time and peak memory);
2. ``ckpt``: ``ckpt.Checkpointer(dir, every_n_steps=E, keep_last=K, host_budget_bytes=B,
   when_busy=...)`` with ``attach(optimizer)``; ``save(step, {"model", "optim", "step"})``
   every step (it returns at once on non-checkpoint steps); durable (fsync) unless
   ``--no-durable``;
3. ``torch_save``: ``torch.save({"model": model.state_dict(), "optim": opt.state_dict(),
   "step": s}, f)`` then ``f.flush(); os.fsync(f)`` (fsync added for fairness: our engine and DCP
   fsync; the directory entry is not fsynced); synchronous;
4. ``dcp``: ``torch.distributed.checkpoint.save`` of ``get_state_dict(model, opt)`` (synchronous,
   one process, no process group; default ``FileSystemWriter``: one file per rank,
   ``sync_files=True``, i.e. fsync);
5. ``dcp_async``: ``torch.distributed.checkpoint.state_dict_saver.async_save`` of the same,
   under a 1-rank gloo process group on 127.0.0.1 (async_save needs one), default stager; before
   each save the previous future is waited for (as DCP's docs recommend) and that wait counts as
   stall.

Optional variants of ours (``--methods``): ``ckpt_skip`` (``when_busy="skip"``) and
``ckpt_nodurable`` (``durable=False``: no fsync, data left in the page cache).

Each method runs in its own subprocess (so peak RSS does not mix) and its own fresh storage
directory, which is deleted afterwards. Old checkpoints beyond ``--keep-last`` are deleted by
every method (ours: its own retention, in the background; the others: right after the save,
timed apart and NOT counted in their step time or stall). Methods are interleaved within a
repeat (the order rotates per repeat) and medians over ``--repeat`` runs are reported.

Per step the worker times forward+backward, ``optimizer.step()`` (for ours split into the
Checkpointer's pre-step hook wait and the step proper) and the save call. Stall per checkpoint:

* ours: ``status()`` row ``stall_s`` of that checkpoint (time ``save`` blocked) plus the
  increase of ``status().hook_stall_s`` over the optimizer steps until the next checkpoint
  (the pre-step hook waiting for the lazy copy); a second pair of pre-step hooks registered
  around ours measures the same wait from outside, as a cross-check;
* torch_save / dcp: wall time of the call (state dict helpers included);
* dcp_async: wall time of ``async_save`` plus the wait on the previous future.

Also: median step time (all timed steps; also non-checkpoint steps only), mean step time
(throughput), their overhead vs ``none`` in percent; the training time one checkpoint costs,
measured in-run against the same process's steps before its first checkpoint (robust to the
drift between processes on a shared machine; ``none``'s own figure is the noise level), and
that cost over ``every`` clean steps (the throughput cost at this interval); loop wall time, drain time (waiting at the
end for outstanding background saves) and total wall time; save→durable latency per
checkpoint; peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss`` and ``VmHWM`` at the end of the
worker, and the RSS after warm-up, before the timed loop) and, for ours, the host pool peak vs
the configured budget.

    python benchmarks/bench_engine.py                         # ~90M params (~1.09 GB state), 3 repeats
    python benchmarks/bench_engine.py --every 1 --steps 12    # every step
    python benchmarks/bench_engine.py --quick                 # smoke test, < 1 minute
    python benchmarks/bench_engine.py --json out.json

Internal: ``--_worker METHOD --_out FILE`` runs one method and writes its figures as JSON.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

ALL_METHODS = ("none", "ckpt", "torch_save", "dcp", "dcp_async")
VARIANTS = ("ckpt_skip", "ckpt_nodurable", "ckpt_agent")
ALIGN = 64


# ---------------------------------------------------------------------------------------------
# The model


def build_model(args: argparse.Namespace):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.ln1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.ln2 = nn.LayerNorm(d)
            self.fc = nn.Linear(d, 4 * d)
            self.out = nn.Linear(4 * d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
            q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
            super().__init__()
            self.tok = nn.Embedding(vocab, d)
            self.pos = nn.Embedding(seq, d)
            self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
            self.ln_f = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.ln_f(x))

    torch.manual_seed(args.seed)
    return GPT(args.vocab, args.d_model, args.layers, args.heads, args.seq)


def shape_model(args: argparse.Namespace) -> None:
    """Pick width, vocabulary and depth for about ``--params-m`` million parameters."""
    if args.d_model is None:
        args.d_model = 768 if args.params_m >= 30 else 256
    if args.vocab is None:
        args.vocab = 8192 if args.params_m >= 30 else 2048
    d, v = args.d_model, args.vocab
    per_block = 12 * d * d + 13 * d
    fixed = 2 * v * d + args.seq * d + 2 * d
    args.layers = max(1, round((args.params_m * 1e6 - fixed) / per_block))
    args.heads = max(1, d // 64)
    args.n_params = fixed + args.layers * per_block


# ---------------------------------------------------------------------------------------------
# One method, in its own process


def _vm_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_agent(root: str, budget: int, *, shm_dir: str | None = None) -> tuple[str, Any]:
    """A ``ckpt-agent serve`` subprocess with this budget; its address once it serves."""
    sock, ready = os.path.join(root, "agent.sock"), os.path.join(root, "agent.ready")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "serve", "--socket", sock, "--memory-budget", str(budget),
         "--shm-prefix", f"benchagent{os.getpid()}", "--ready-file", ready, "--log-level", "WARNING",
         *(["--shm-dir", shm_dir] if shm_dir else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        if os.path.exists(ready):
            return f"unix://{sock}", proc
        if proc.poll() is not None:
            raise SystemExit(f"the agent exited with status {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the agent did not start in 30 s")


def _stop_agent(proc: Any) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _rm(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    warnings.filterwarnings("ignore")
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    method = args._worker
    t_start = time.perf_counter()
    model = build_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=args.fused or None)
    gen = torch.Generator().manual_seed(args.seed + 1)

    def batch() -> torch.Tensor:
        return torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)

    def train_step() -> tuple[float, float, float]:
        """forward+backward seconds, optimizer.step() seconds, loss"""
        x = batch()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, float(loss.detach())

    for _ in range(args.warmup):  # creates the AdamW state; first steps allocate
        train_step()
    state_bytes = sum(_aligned(t.numel() * t.element_size()) for t in model.state_dict().values())
    for st in opt.state.values():
        state_bytes += sum(_aligned(t.numel() * t.element_size()) for t in st.values() if isinstance(t, torch.Tensor))
    rss_before_loop = _vm_kib("VmRSS") * 1024
    setup_s = time.perf_counter() - t_start
    if method.startswith("ckpt"):
        import ckpt  # imported before the clock starts, like torch.distributed.checkpoint below
    else:
        import torch.distributed.checkpoint

    root = tempfile.mkdtemp(prefix=f"bench-engine-{method}-", dir=args.root)
    out: dict[str, Any] = {"method": method, "state_bytes": state_bytes, "setup_s": setup_s, "dir": root}

    # -- per method: save(step) -> seconds blocked; finish() -> drain seconds ------------------
    commit_at: dict[int, float] = {}
    save_at: dict[int, float] = {}
    gc_s = [0.0]
    saved: list[str] = []

    def gc_keep(keep: int) -> None:
        t = time.perf_counter()
        while len(saved) > keep:
            _rm(saved.pop(0))
        gc_s[0] += time.perf_counter() - t

    ckptr = None
    outer_hook = [0.0, 0.0]  # start of our hook's window, total measured from outside
    if method.startswith("ckpt"):
        import ckpt

        budget = int(args.budget_x * state_bytes) + (1 << 20)
        out["ckpt_module"] = ckpt.__file__
        agent_address = None
        if method == "ckpt_agent":  # the same engine; persist and commit in a node agent's process
            agent_address, agent_proc = _start_agent(root, budget)
            atexit.register(_stop_agent, agent_proc)
        ckptr = ckpt.Checkpointer(
            root if agent_address is None else os.path.join(root, "run"), agent=agent_address,
            every_n_steps=args.every, keep_last=args.keep_last, host_budget_bytes=budget,
            when_busy="skip" if method == "ckpt_skip" else args.when_busy,
            durable=not (args.no_durable or method == "ckpt_nodurable"),
        )

        def before(o, a, k):
            outer_hook[0] = time.perf_counter()

        def after(o, a, k):
            outer_hook[1] += time.perf_counter() - outer_hook[0]

        opt.register_step_pre_hook(before)
        ckptr.attach(opt)
        opt.register_step_pre_hook(after)
        state = {"model": model, "optim": opt, "step": 0}

        def do_save(step: int) -> None:
            state["step"] = step
            h = ckptr.save(step, state)
            if h is not None and not h.skipped:
                save_at[step] = time.perf_counter()
                h.committed.add_done_callback(lambda f, s=step: commit_at.__setitem__(s, time.perf_counter()))

        def finish() -> None:
            ckptr.wait()

    elif method == "torch_save":

        def do_save(step: int) -> None:
            path = os.path.join(root, f"step_{step}.pt")
            with open(path, "wb") as f:
                torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step}, f)
                f.flush()
                os.fsync(f.fileno())
            saved.append(path)

        def finish() -> None:
            pass

    elif method in ("dcp", "dcp_async"):
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.checkpoint.state_dict_saver import async_save

        if method == "dcp_async":
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        prev: list[Any] = []

        def do_save(step: int) -> None:
            path = os.path.join(root, f"step_{step}")
            msd, osd = get_state_dict(model, opt)
            sd = {"model": msd, "optim": osd, "step": step}
            if method == "dcp":
                dcp.save(sd, checkpoint_id=path)
                saved.append(path)
                return
            if prev:
                prev.pop().result()
            fut = async_save(sd, checkpoint_id=path)
            save_at[step] = time.perf_counter()
            fut.add_done_callback(lambda f, s=step: commit_at.__setitem__(s, time.perf_counter()))
            prev.append(fut)
            saved.append(path)

        def finish() -> None:
            if prev:
                prev.pop().result()

    elif method == "none":

        def do_save(step: int) -> None:
            pass

        def finish() -> None:
            pass

    else:
        raise SystemExit(f"unknown method {method}")

    # -- the timed loop --------------------------------------------------------------------------
    rows: list[dict[str, Any]] = []
    hook_total_prev = 0.0
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    loop_t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        outer_before = outer_hook[1]
        fb, opt_s, loss = train_step()
        hook = 0.0
        if ckptr is not None:
            total = ckptr.status().hook_stall_s
            hook, hook_total_prev = total - hook_total_prev, total
        is_ckpt = step % args.every == 0
        t1 = time.perf_counter()
        if method == "ckpt" or method.startswith("ckpt_"):
            do_save(step)  # every step: the Checkpointer decides
        elif is_ckpt:
            do_save(step)
        t2 = time.perf_counter()
        gc_before = gc_s[0]
        if method in ("torch_save", "dcp"):
            gc_keep(args.keep_last)
        elif method == "dcp_async" and is_ckpt:
            gc_keep(args.keep_last + 1)  # the newest one may still be being written
        t3 = time.perf_counter()
        rows.append({
            "step": step, "ckpt": is_ckpt, "fb_s": fb, "opt_s": opt_s - hook, "hook_s": hook,
            "hook_outer_s": outer_hook[1] - outer_before, "save_s": t2 - t1,
            "step_s": (t3 - t0) - (gc_s[0] - gc_before), "loss": loss,
        })
    loop_s = time.perf_counter() - loop_t0 - gc_s[0]
    t = time.perf_counter()
    finish()
    drain_s = time.perf_counter() - t
    close_s = 0.0
    if ckptr is not None:
        st = ckptr.status()
        t = time.perf_counter()
        ckptr.close()
        close_s = time.perf_counter() - t
        by_step = {r["step"]: r for r in st.checkpoints}
        # stall of checkpoint s: save() blocking + hook waits until the next checkpoint
        stalls = [by_step[r["step"]]["stall_s"] if r["step"] in by_step else r["save_s"] for r in rows if r["ckpt"]]
        # the hook wait caused by checkpoint s shows up at steps s+1.. (the next optimizer.step)
        hooks_attr = []
        ck_steps = [r["step"] for r in rows if r["ckpt"]]
        for i, s in enumerate(ck_steps):
            nxt = ck_steps[i + 1] if i + 1 < len(ck_steps) else args.steps + 1
            hooks_attr.append(sum(r["hook_s"] for r in rows if s < r["step"] <= nxt))
        out["save_stall_s"] = stalls
        out["hook_stall_per_ckpt_s"] = hooks_attr
        out["stall_s"] = [a + b for a, b in zip(stalls, hooks_attr)]
        out["hook_stall_total_status_s"] = st.hook_stall_s
        out["hook_stall_total_outer_s"] = outer_hook[1]
        out["host_budget_bytes"] = st.host_budget_bytes
        out["host_peak_bytes"] = st.host_peak_bytes
        out["host_allocations"] = st.host_allocations
        out["checkpoint_states"] = [r["state"] for r in st.checkpoints]
        out["skipped"] = st.skipped
        out["failed"] = st.failed
        out["errors"] = list(st.errors)
        out["committed"] = sum(1 for r in ckptr.status().checkpoints if r["state"] == "committed")
    else:
        if method == "dcp_async":
            # the wait on the previous future is inside the timed save call: that is the stall
            out["stall_s"] = [r["save_s"] for r in rows if r["ckpt"]]
            import torch.distributed as dist

            dist.destroy_process_group()
        else:
            out["stall_s"] = [r["save_s"] for r in rows if r["ckpt"]]
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_user_s"] = ru1.ru_utime - ru0.ru_utime  # loop + drain + close, all threads
    out["cpu_sys_s"] = ru1.ru_stime - ru0.ru_stime
    out["durable_latency_s"] = [commit_at[s] - save_at[s] for s in sorted(commit_at) if s in save_at]
    out.update({
        "rows": rows, "loop_s": loop_s, "drain_s": drain_s, "close_s": close_s,
        "total_s": loop_s + drain_s + close_s, "gc_s": gc_s[0],
        "rss_before_loop_bytes": rss_before_loop,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "vm_hwm_bytes": _vm_kib("VmHWM") * 1024,
        "final_loss": rows[-1]["loss"] if rows else None,
    })
    shutil.rmtree(root, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# The driver


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def in_run_cost(rows: list[dict[str, Any]], every: int) -> tuple[float, float]:
    """Training time one checkpoint costs, measured against the same process's own steps before
    its first checkpoint (robust to the drift between processes on a shared machine): for each
    checkpoint k with a full window, sum(step time of steps k .. k+every-1) - every x the mean
    clean step. Returns (median over checkpoints, that / (every x clean step)); NaN if every < 2."""
    clean = [r["step_s"] for r in rows if r["step"] < every]
    if every < 2 or not clean:
        return float("nan"), float("nan")
    base = statistics.fmean(clean)
    by_step = {r["step"]: r["step_s"] for r in rows}
    last = max(by_step)
    costs = [sum(by_step[j] for j in range(k, k + every)) - every * base
             for k in range(every, last + 1, every) if k + every - 1 <= last]
    if not costs:
        return float("nan"), float("nan")
    c = statistics.median(costs)
    return c, c / (every * base)


def summarize(run: dict[str, Any], every: int) -> dict[str, Any]:
    rows = run["rows"]
    cost, cost_frac = in_run_cost(rows, every)
    steps = [r["step_s"] for r in rows]
    nonck = [r["step_s"] for r in rows if not r["ckpt"]]
    return {
        "step_median_s": _median(steps),
        "step_mean_s": statistics.fmean(steps) if steps else float("nan"),
        "step_median_nonckpt_s": _median(nonck),
        "fb_median_s": _median([r["fb_s"] for r in rows]),
        "opt_median_s": _median([r["opt_s"] for r in rows]),
        "stall_median_s": _median(run["stall_s"]),
        "cost_per_ckpt_s": cost,  # in-run estimate, see in_run_cost
        "steady_overhead": cost_frac,  # cost / (every x clean step): throughput cost at this interval
        "stall_max_s": max(run["stall_s"]) if run["stall_s"] else float("nan"),
        "stall_total_s": sum(run["stall_s"]),
        "n_ckpt": len(run["stall_s"]),
        "durable_latency_median_s": _median(run.get("durable_latency_s", [])),
        "cpu_user_s": run["cpu_user_s"],
        "cpu_sys_s": run["cpu_sys_s"],
        "loop_s": run["loop_s"],
        "drain_s": run["drain_s"],
        "total_s": run["total_s"],
        "peak_rss_bytes": run["peak_rss_bytes"],
        "rss_before_loop_bytes": run["rss_before_loop_bytes"],
        "host_peak_bytes": run.get("host_peak_bytes"),
        "host_budget_bytes": run.get("host_budget_bytes"),
        "skipped": run.get("skipped"),
        "save_stall_median_s": _median(run.get("save_stall_s", [])),
        "hook_stall_median_s": _median(run.get("hook_stall_per_ckpt_s", [])),
    }


def run_worker(method: str, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    fd, path = tempfile.mkstemp(prefix=f"bench-engine-{method}-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_worker", method, "--_out", path]
    env = dict(os.environ)
    repo = args.ckpt_path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout)
        raise SystemExit(f"worker {method} failed with exit status {proc.returncode}")
    with open(path) as f:
        out = json.load(f)
    os.remove(path)
    out["process_wall_s"] = wall
    return out


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def fmt_s(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params-m", type=float, default=90.0, help="model size in millions of parameters")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=30, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (they create the AdamW state)")
    p.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--budget-x", type=float, default=2.0, help="our host budget, in units of the state size")
    p.add_argument("--when-busy", choices=("block", "skip"), default="block")
    p.add_argument("--no-durable", action="store_true", help="ours without fsync (durable=False)")
    p.add_argument("--fused", action="store_true", help="AdamW(fused=True)")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma-separated, from {', '.join(ALL_METHODS + VARIANTS)}")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--root", default=None, help="parent of the storage directories (default: $TMPDIR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--switch-interval", type=float, default=None,
                   help="sys.setswitchinterval in every worker (Python's default: 0.005 s)")
    p.add_argument("--ckpt-path", default=None,
                   help="import ckpt from this directory instead of this checkout (to A/B a patched copy)")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--quick", action="store_true", help="small model, few steps: smoke test")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = p.parse_args(argv)
    if args.quick:
        args.params_m, args.steps, args.every, args.repeat, args.warmup = 2.0, 4, 2, 1, 1
    shape_model(args)

    if args._worker:
        res = worker(args)
        with open(args._out, "w") as f:
            json.dump(res, f)
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ALL_METHODS + VARIANTS:
            raise SystemExit(f"unknown method {m}")
    worker_argv = [a for a in argv if a not in ("--quick",)]
    if args.quick:  # pass the resolved quick settings explicitly
        worker_argv += ["--params-m", str(args.params_m), "--steps", str(args.steps), "--every", str(args.every),
                        "--warmup", str(args.warmup)]
    state_gb = 12 * args.n_params / 1e9
    print(f"model: {args.n_params / 1e6:.1f}M params (d={args.d_model}, layers={args.layers}, heads={args.heads}, "
          f"vocab={args.vocab}), seq {args.seq} x batch {args.batch}; model+AdamW ~{state_gb:.2f} GB; "
          f"{args.steps} timed steps, checkpoint every {args.every}; {args.repeat} repeat(s); "
          f"torch threads: default; cores: {os.cpu_count()}", flush=True)

    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    t_all = time.perf_counter()
    for rep in range(args.repeat):
        order = methods[rep % len(methods):] + methods[: rep % len(methods)]
        for m in order:
            res = run_worker(m, args, worker_argv)
            s = summarize(res, args.every)
            runs[m].append({"summary": s, "raw": res})
            extra = ""
            if m.startswith("ckpt"):
                extra = (f" (save {fmt_s(s['save_stall_median_s'])} + hook {fmt_s(s['hook_stall_median_s'])})"
                         f" pool peak {gb(s['host_peak_bytes'])}/{gb(s['host_budget_bytes'])} GB"
                         f" skipped {s['skipped']}")
            print(f"[{rep + 1}/{args.repeat}] {m:15s} step med {fmt_s(s['step_median_s'])} mean "
                  f"{fmt_s(s['step_mean_s'])}  stall med {fmt_s(s['stall_median_s'])}{extra}  loop "
                  f"{s['loop_s']:.1f} s drain {s['drain_s']:.1f} s  peak RSS {gb(s['peak_rss_bytes'])} GB",
                  flush=True)

    # -- medians over repeats ---------------------------------------------------------------------
    keys = list(next(iter(runs.values()))[0]["summary"].keys())
    med: dict[str, dict[str, Any]] = {}
    for m, rs in runs.items():
        med[m] = {}
        for k in keys:
            vals = [r["summary"][k] for r in rs if r["summary"][k] is not None]
            med[m][k] = _median(vals) if vals else None
    base = med.get("none")

    def pct(m: str, k: str) -> str:
        if not base or m == "none":
            return "-"
        return f"{100 * (med[m][k] / base[k] - 1):+.1f}%"

    print()
    print(f"Medians over {args.repeat} repeat(s); state {gb(runs[methods[0]][0]['raw']['state_bytes'])} GB; "
          f"checkpoint every {args.every} step(s), {args.steps} steps")
    cols = [
        ("method", 15, lambda m, s: m),
        ("stall/ckpt", 10, lambda m, s: "-" if m == "none" else fmt_s(s["stall_median_s"])),
        ("stall max", 9, lambda m, s: "-" if m == "none" else fmt_s(s["stall_max_s"])),
        ("step med", 9, lambda m, s: fmt_s(s["step_median_s"])),
        ("ovh med", 8, lambda m, s: pct(m, "step_median_s")),
        ("step mean", 9, lambda m, s: fmt_s(s["step_mean_s"])),
        ("ovh mean", 8, lambda m, s: pct(m, "step_mean_s")),
        ("loop", 7, lambda m, s: f"{s['loop_s']:.1f} s"),
        ("drain", 6, lambda m, s: f"{s['drain_s']:.1f} s"),
        ("total", 7, lambda m, s: f"{s['total_s']:.1f} s"),
        ("lost/ckpt", 9, lambda m, s: "-" if not base or m == "none" or not s["n_ckpt"] else
         f"{(s['loop_s'] - base['loop_s']) / s['n_ckpt']:.2f} s"),
        ("cost/ckpt", 9, lambda m, s: fmt_s(s["cost_per_ckpt_s"])),
        ("steady", 7, lambda m, s: "-" if s["steady_overhead"] is None or math.isnan(s["steady_overhead"])
         else f"{100 * s['steady_overhead']:+.0f}%"),
        ("CPU u+s", 8, lambda m, s: f"{s['cpu_user_s'] + s['cpu_sys_s']:.0f} s"),
        ("peak RSS", 9, lambda m, s: gb(s["peak_rss_bytes"]) + " GB"),
        ("+RSS", 6, lambda m, s: "-" if not base or m == "none" else f"{(s['peak_rss_bytes'] - base['peak_rss_bytes']) / 1e9:+.2f}"),
        ("durable", 8, lambda m, s: fmt_s(s["durable_latency_median_s"])),
    ]
    print(" ".join(f"{h:<{w}s}" if i == 0 else f"{h:>{w}s}" for i, (h, w, _) in enumerate(cols)))
    for m in methods:
        print(" ".join(f"{f(m, med[m]):<{w}s}" if i == 0 else f"{f(m, med[m]):>{w}s}"
                       for i, (_, w, f) in enumerate(cols)))
    print("(stall: median per checkpoint; step med/mean: per timed step; ovh: vs none; loop: timed steps; drain: "
          "waiting for background saves after the loop; lost/ckpt: (loop - loop of none) / checkpoints; cost/ckpt: "
          "the same measured in-run against the process's own steps before its first checkpoint (median over "
          "checkpoints with a full window of `every` steps; none's is the noise level); steady: cost/ckpt / "
          "(every x clean step), the throughput cost at this interval; CPU: user+sys "
          "of all threads over loop+drain; +RSS: peak RSS over none's; durable: save call -> committed, async only)")
    ratios: dict[str, Any] = {}
    if "ckpt" in med:
        s = med["ckpt"]
        print()
        print(f"ours: host pool peak {gb(s['host_peak_bytes'])} GB of a {gb(s['host_budget_bytes'])} GB budget "
              f"({'within' if (s['host_peak_bytes'] or 0) <= (s['host_budget_bytes'] or 0) else 'OVER'}); "
              f"per checkpoint: save() blocked {fmt_s(s['save_stall_median_s'])}, pre-step hook waited "
              f"{fmt_s(s['hook_stall_median_s'])} (medians); peak RSS {gb(s['peak_rss_bytes'])} GB vs baseline "
              f"{gb(base['peak_rss_bytes']) if base else '-'} GB")
        ratios["host_pool_within_budget"] = (s["host_peak_bytes"] or 0) <= (s["host_budget_bytes"] or 0)
        if "dcp_async" in med:
            r = s["stall_median_s"] / med["dcp_async"]["stall_median_s"]
            ratios["stall_ours_over_dcp_async"] = r
            print(f"ratio: our stall / DCP async_save blocking = {r:.4f} ({f'1/{1 / r:.1f}' if r < 1 else f'{r:.1f}x'}; target <= 1/20: "
                  f"{'MET' if r <= 1 / 20 else 'NOT met'})")
        if base:
            ovh = s["step_mean_s"] / base["step_mean_s"] - 1
            ovh_med = s["step_median_s"] / base["step_median_s"] - 1
            ratios["throughput_cost_mean"] = ovh
            ratios["throughput_cost_median"] = ovh_med
            print(f"ratio: our throughput cost at every={args.every}: mean step {100 * ovh:+.1f}%, median step "
                  f"{100 * ovh_med:+.1f}% (target <= 10%: {'MET' if ovh <= 0.10 else 'NOT met'})")
            if s["steady_overhead"] is not None and not math.isnan(s["steady_overhead"]):
                ratios["steady_overhead_in_run"] = s["steady_overhead"]
                print(f"       in-run: each checkpoint costs {fmt_s(s['cost_per_ckpt_s'])} of training time = "
                      f"{100 * s['steady_overhead']:+.0f}% at every={args.every} (none's in-run figure, the noise: "
                      f"{fmt_s(base['cost_per_ckpt_s'])})")
            if s["n_ckpt"]:
                lost = (s["loop_s"] - base["loop_s"]) / s["n_ckpt"]
                ratios["lost_s_per_ckpt"] = lost
                need = lost / (0.10 * base["step_mean_s"])
                print(f"       training time lost per checkpoint {lost:.2f} s: <= 10% needs a checkpoint every "
                      f">= {max(need, 1):.0f} steps of {fmt_s(base['step_mean_s'])} at this rate")
        for other in ("torch_save", "dcp"):
            if other in med:
                ratios[f"stall_ours_over_{other}"] = s["stall_median_s"] / med[other]["stall_median_s"]
    if base:
        print(f"baseline (none): peak RSS {gb(base['peak_rss_bytes'])} GB, RSS before loop "
              f"{gb(base['rss_before_loop_bytes'])} GB")
    print(f"all runs: {time.perf_counter() - t_all:.0f} s")

    if args.json:
        doc = {
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count(), "torch": __import__("torch").__version__},
            "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "medians": med, "ratios": ratios,
            "runs": {m: [{"summary": r["summary"], **{k: v for k, v in r["raw"].items() if k != "dir"}} for r in rs]
                     for m, rs in runs.items()},
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
