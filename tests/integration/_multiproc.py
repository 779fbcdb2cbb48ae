"""Run a function in N fresh processes joined by a gloo process group, for integration tests.

``run_distributed(fn, world, *args, tmp_path=...)`` starts ``world`` processes, joins them with
a gloo process group over loopback whose rendezvous is a ``FileStore`` in ``tmp_path`` (no TCP
port to pick), calls ``fn(rank, world, *args)`` in each and returns the per-rank results
(anything ``torch.save`` can serialize), in rank order.

Processes are never forked from the pytest process: they come from a fork server (a fresh
interpreter that has imported torch once; see ``_context``) or, where there is none or
``CKPT_TEST_START_METHOD=spawn`` is set, are spawned.

Every process is ended: a child that raises fails the test with the child's traceback; a child
that dies without reporting, or a launch that exceeds ``timeout`` (a hang), fails the test too,
and the processes still running are terminated, then killed. Collectives time out after
``pg_timeout`` so that the peers of a failed rank report rather than hang.

A test of a rank that dies on purpose passes ``expect_exit={rank: code}``: that rank must end
with exit status ``code`` without reporting (its result is ``None``), and the other ranks skip
the final barrier, which a dead peer could never join.

``fn`` and ``args`` are pickled into the children, so ``fn`` must be a module-level function of
an importable module (the test modules are, as ``tests.integration.<name>``). Pass tensors to
children through files.
"""

from __future__ import annotations

import datetime
import io
import multiprocessing
import os
import queue
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# After one rank fails, how long the others get to report their own errors before being ended.
_GRACE_AFTER_ERROR_S = 3.0
# A child seen dead without a report may still have its report in the pipe: wait this long.
_GRACE_AFTER_DEATH_S = 2.0


def _child(
    fn: Callable[..., Any], rank: int, world: int, store_path: str, args: tuple, results: Any, pg_timeout: float,
    final_barrier: bool = True,
) -> None:
    try:
        torch.set_num_threads(1)  # up to 8 processes share 2 CI cores
        # Loopback, whatever the host name resolves to.
        linux_lo = sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists()
        if linux_lo and "GLOO_SOCKET_IFNAME" not in os.environ:
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            store=dist.FileStore(store_path, world),
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        value = fn(rank, world, *args)
        if final_barrier:
            dist.barrier()  # nobody tears the group down while a peer is still in a collective
        dist.destroy_process_group()
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        results.put((rank, False, traceback.format_exc()))


# What a child needs before it runs a test's function; the forkserver imports it once.
_PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.tensor",
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint.state_dict",
    "ckpt",
]


def _context(start_method: str | None) -> Any:
    """``forkserver`` where there is one, else ``spawn``: never a fork of the pytest process.

    The fork server is a fresh interpreter that imports torch once, then forks a child per
    rank: children start in milliseconds instead of seconds of importing torch each (8 ranks
    on 2 CI cores: about 12 s per launch with ``spawn``). The server starts no threads before
    forking (torch creates its thread pools lazily), so the children are as clean as spawned
    ones; it exits with the pytest process.
    """
    method = start_method or os.environ.get("CKPT_TEST_START_METHOD") or (
        "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    )
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)  # no effect once the server runs
    return ctx


def run_distributed(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    tmp_path: Path,
    timeout: float = 150.0,
    pg_timeout: float = 60.0,
    start_method: str | None = None,
    expect_exit: dict[int, int] | None = None,
) -> list[Any]:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each run in its own process.

    ``expect_exit``: ranks that must die with the given exit status without reporting; their
    result is ``None``.
    """
    expect_exit = dict(expect_exit or {})
    ctx = _context(start_method)
    results = ctx.Queue()
    store = Path(tmp_path) / f"pg-store-{uuid.uuid4().hex}"
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, rank, world, str(store), args, results, pg_timeout, not expect_exit),
            name=f"{getattr(fn, '__name__', 'worker')}-rank{rank}",
            daemon=True,
        )
        for rank in range(world)
    ]
    done: dict[int, Any] = {}
    errors: dict[int, str] = {}
    dead_since: dict[int, float] = {}
    start = time.monotonic()
    deadline = start + timeout
    try:
        for p in procs:
            p.start()
        while len(done) + len(errors) < world:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                rank, ok, payload = results.get(timeout=min(0.5, deadline - now))
            except queue.Empty:
                now = time.monotonic()
                for rank, p in enumerate(procs):
                    if rank in done or rank in errors or p.exitcode is None:
                        continue
                    if rank in expect_exit and p.exitcode == expect_exit[rank]:
                        done[rank] = None  # died as the test intended
                        continue
                    first = dead_since.setdefault(rank, now)
                    if now - first > _GRACE_AFTER_DEATH_S:
                        errors[rank] = f"exited with code {p.exitcode} without reporting a result"
                continue
            if ok and rank in expect_exit:
                errors[rank] = f"reported a result, but was expected to exit with code {expect_exit[rank]}"
                deadline = min(deadline, time.monotonic() + _GRACE_AFTER_ERROR_S)
            elif ok:
                done[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors[rank] = payload
                deadline = min(deadline, time.monotonic() + _GRACE_AFTER_ERROR_S)
    finally:
        for p in procs:
            if p.pid is None:
                continue
            p.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())) if not errors else 0.5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
    missing = [r for r in range(world) if r not in done and r not in errors]
    if errors or missing:
        elapsed = time.monotonic() - start
        # A rank that died without a word first, then in the order they reported: the first is
        # usually the cause, the others its echoes (a peer's connection closed, a timeout).
        order = sorted(errors, key=lambda r: r not in dead_since)
        parts = [f"rank {r} of {world} failed:\n{errors[r]}" for r in order]
        if missing:
            parts.append(
                f"ranks {missing} of {world} did not finish (hung, or stopped after another rank "
                f"failed) within {elapsed:.0f}s (timeout {timeout:.0f}s); they were terminated"
            )
        name = getattr(fn, "__name__", fn)
        pytest.fail(f"distributed run of {name!r} failed:\n\n" + "\n\n".join(parts), pytrace=False)
    return [done[r] for r in range(world)]
