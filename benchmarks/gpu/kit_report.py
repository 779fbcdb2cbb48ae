"""The GPU kit's report: sections timed and kept when one fails, the JSON and Markdown written
after each, and the targets (see ``bench_gpu.py``)."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
import traceback
from collections.abc import Iterator
from typing import Any

GB = 1e9


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


class Report:
    def __init__(self, out_dir: str, deadline: float, only: set[str] | None = None) -> None:
        self.out_dir = out_dir
        self.deadline = deadline
        self.only = only  # sections to run (None: all)
        self.data: dict[str, Any] = {"sections": {}}
        os.makedirs(out_dir, exist_ok=True)

    @contextlib.contextmanager
    def section(self, name: str, need_s: float) -> Iterator[dict[str, Any] | None]:
        left = self.deadline - time.monotonic()
        if self.only is not None and name not in self.only and name != "env":
            self.data["sections"][name] = {"status": "skipped", "why": "not asked for (--sections)"}
            yield None
            return
        if left < need_s:
            self.data["sections"][name] = {"status": "skipped", "why": f"{left:.0f} s of budget left, needs ~{need_s:.0f}"}
            print(f"[{name}] skipped: {left:.0f} s left of the budget", flush=True)
            self.write()
            yield None
            return
        print(f"[{name}] ...", flush=True)
        t0 = time.perf_counter()
        body: dict[str, Any] = {}
        self.data[name] = body
        try:
            yield body
            self.data["sections"][name] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # noqa: BLE001 - recorded; the next section still runs
            self.data["sections"][name] = {"status": "failed", "seconds": round(time.perf_counter() - t0, 1),
                                           "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            print(f"[{name}] FAILED: {type(e).__name__}: {e}\n{traceback.format_exc()}", flush=True)
        else:
            print(f"[{name}] ok in {time.perf_counter() - t0:.1f} s", flush=True)
        self.write()

    def write(self) -> None:
        with open(os.path.join(self.out_dir, "gpu_bench.json"), "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        with open(os.path.join(self.out_dir, "gpu_bench.md"), "w") as f:
            f.write(markdown(self.data))


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(d: dict[str, Any]) -> str:
    env = d.get("env", {})
    lines = [f"# GPU kit: {env.get('device_name', '?')} ({'dry run on CPU' if env.get('cpu') else 'GPU'})", ""]
    lines.append(f"torch {env.get('torch')}, CUDA {env.get('cuda')}; model {env.get('params_m')} M parameters, "
                 f"state {_fmt(env.get('state_gb'), '.2f')} GB ({env.get('state_tensors')} tensors); "
                 f"step {_fmt(env.get('step_s'), '.3f')} s ({env.get('micro_batches')} micro-batches of "
                 f"{env.get('micro_batch')}x{env.get('seq')} tokens); storage on {env.get('storage_fs')}, "
                 f"agent memory on {env.get('agent_fs')}.")
    lines.append("")
    bw = d.get("bandwidth", {})
    if bw:
        lines += ["## Bandwidth limits (GB/s)", "", "| copy | GB/s |", "| --- | --- |"]
        for k in ("d2h_pinned_per_tensor", "d2h_pinned_one_buffer", "d2h_pageable_one_buffer", "h2d_pinned_one_buffer"):
            lines.append(f"| {k} | {_fmt(bw.get(k), '.1f')} |")
        for k, v in (bw.get("registered") or {}).items():
            if isinstance(v, dict):
                lines.append(f"| d2h_registered_{k} | {_fmt(v.get('gbps'), '.1f')} {v.get('error', '')} |")
            else:
                lines.append(f"| {k} | {v} |")
        lines.append("")
    st = d.get("staging", {})
    if st:
        lines += ["## Staging (nothing else running)", "",
                  "| path | copy GB/s | x bare pinned copy | save() call s | GB/s counting the call |",
                  "| --- | --- | --- | --- | --- |"]
        for k, v in st.items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {_fmt(v.get('gbps'), '.1f')} | {_fmt(v.get('vs_pinned_copy'), '.2f')} | "
                             f"{_fmt(v.get('call_s'), '.4f')} | {_fmt(v.get('with_call_gbps'), '.1f')} |")
        lines.append("")
    for name in ("loop_every10", "loop_every1"):
        loop = d.get(name)
        if not loop:
            continue
        lines += [f"## Training loop, checkpoint {name.removeprefix('loop_')}", "",
                  "| method | mean step s | overhead vs none | stall/ckpt median s | stall x ckpt's | save→durable s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for m, r in loop.items():
            if not isinstance(r, dict):
                continue
            if "error" in r:
                lines.append(f"| {m} | failed: {r['error'][:80]} | | | | |")
                continue
            lines.append(f"| {m} | {_fmt(r.get('mean_step_s'), '.4f')} | {_fmt(r.get('overhead_pct'), '.1f')}% | "
                         f"{_fmt(r.get('stall_median_s'), '.4f')} | {_fmt(r.get('stall_x_ckpt'), '.1f')} | "
                         f"{_fmt(r.get('durable_median_s'), '.2f')} |")
        lines.append("")
    rs = d.get("restore", {})
    if rs:
        lines += ["## Restore host → device", "",
                  "| from | seconds | GB/s | restore call alone s | its GB/s | bit-exact |", "| --- | --- | --- | --- | --- | --- |"]
        for k, v in rs.items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {_fmt(v.get('s'), '.3f')} | {_fmt(v.get('gbps'), '.2f')} | {_fmt(v.get('restore_s'), '.3f')} | "
                             f"{_fmt(v.get('restore_gbps'), '.2f')} | {v.get('bit_exact')} |")
        lines.append("")
    tg = d.get("targets", {})
    if tg:
        lines += ["## Targets", "", "| target | measured | met |", "| --- | --- | --- |"]
        for k, v in tg.items():
            lines.append(f"| {k} | {v.get('measured')} | {v.get('met')} |")
        lines.append("")
    lines += ["## Sections", ""]
    for k, v in d.get("sections", {}).items():
        lines.append(f"- {k}: {v.get('status')} {v.get('seconds', '')} {v.get('error', v.get('why', ''))}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The job


def targets(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    l10 = d.get("loop_every10") or {}
    ours = (l10.get("ckpt") or {}).get("stall_median_s")
    for peer in ("dcp_async", "dcp_async_pinned"):
        theirs = (l10.get(peer) or {}).get("stall_median_s")
        if ours is not None and theirs:
            out[f"stall <= 1/20 of {peer}'s (every 10)"] = {"measured": f"{ours / theirs:.4f} (1/{theirs / max(ours, 1e-9):.0f})",
                                                            "met": ours / theirs <= 1 / 20}
    l1 = d.get("loop_every1") or {}
    oh = (l1.get("ckpt") or {}).get("overhead_pct")
    if oh is not None:
        out["checkpoint every step costs <= 10% throughput"] = {"measured": f"{oh:.1f}%", "met": oh <= 10}
    st = (d.get("staging") or {}).get("ckpt") or {}
    if st.get("vs_pinned_copy") is not None:
        out["staging >= 0.8x pinned-copy bandwidth"] = {"measured": f"{st['vs_pinned_copy']:.2f}x",
                                                         "met": st["vs_pinned_copy"] >= 0.8}
    return out


# ---------------------------------------------------------------------------------------------


def method_options(name: str) -> tuple[str, dict[str, object]]:
    """A method and its Checkpointer options: ``ckpt:when_busy=skip+io_threads=2`` is ``ckpt``
    with those options (numbers as ints), so variants of one method run side by side."""
    base, _, spec = name.partition(":")
    opts: dict[str, object] = {}
    for item in filter(None, spec.split("+")):
        key, _, value = item.partition("=")
        opts[key] = int(value) if value.lstrip("-").isdigit() else value
    return base, opts
