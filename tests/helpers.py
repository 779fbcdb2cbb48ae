"""Shared helpers for the tests (imported as ``tests.helpers``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import ckpt
from ckpt.io import writer_values
from ckpt.storage import Storage, StorageWrapper


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` whose bytes are random (NaN payloads and all)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = int(torch.Size(shape).numel()) * dtype.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """``a`` and ``b`` equal exactly, through dicts, lists and tuples: tensors of the same dtype
    and bits, everything else ``==``; ``where`` names the first difference."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def save_as_writers(
    states: list[Any], storage: str | Storage, *, step: int, max_chunk_bytes: int = 8 << 20, layout: str = "packs"
) -> ckpt.Manifest:
    """Save as if ``len(states)`` processes each called save with its own state (one process)."""
    st = ckpt.open_storage(storage)
    world = len(states)
    writers = [ckpt.format.writer_name(r) for r in range(world)]
    for r, state in enumerate(states):
        plan = ckpt.plan_save(state, rank=r, world=world, max_chunk_bytes=max_chunk_bytes)
        ckpt.write_plan(st, plan, step=step, writer=writers[r], save_id="test",
                        layout="chunks" if layout == "chunks" else "packs")
    manifest = ckpt.commit(st, step, writers, save_id="test")
    if layout == "shards":
        from ckpt.consolidate import consolidate

        manifest = consolidate(st, step)
    return manifest


def load_as_readers(states: list[Any], storage: str | Storage, *, step: int | None = None) -> None:
    st = ckpt.open_storage(storage)
    manifest = ckpt.read_manifest(st, step)
    for r, state in enumerate(states):
        writer = ckpt.format.writer_name(r)
        plan = ckpt.plan_load(state, manifest, rank=r, world=len(states), writer=writer,
                              writer_values=writer_values(st, manifest, writer))
        ckpt.execute_load(st, state, plan)


class DelegatingStorage(StorageWrapper):
    """Forwards every call to ``inner`` (the one wrapper base); fault-injecting test storages
    override what they break."""


@contextlib.contextmanager
def local_agent(tmp_path: Path, prefix: str, *, memory_budget_bytes: int = 64 << 20, shm_root: Path | None = None,
                **config: Any) -> Iterator[tuple[Any, Path]]:
    """One in-process agent on ``tmp_path/a.sock`` with its own shm directory (under
    ``shm_root`` if given, e.g. /dev/shm where segments can be pinned for CUDA); stopped after.
    Yields the daemon and its shm directory; trainers reach it at ``unix://<tmp_path>/a.sock``."""
    import shutil
    import tempfile

    from agent.config import AgentConfig
    from agent.daemon import AgentDaemon

    shm = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=shm_root)) if shm_root else tmp_path / "shm"
    shm.mkdir(exist_ok=True)
    daemon = AgentDaemon(AgentConfig(socket_path=str(tmp_path / "a.sock"), memory_budget_bytes=memory_budget_bytes,
                                     shm_dir=str(shm), shm_prefix=prefix, log_format="text", **config))
    daemon.start()
    try:
        yield daemon, shm
    finally:
        daemon.stop()
        if shm_root:
            shutil.rmtree(shm, ignore_errors=True)


# Ray calls a node dead after its health checks fail (some 15-30 s by default) and only then places
# the node's placement-group bundles elsewhere; with this system config, after 2 missed checks of 0.5 s.
QUICK_NODE_DEATH = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 2}


def lose_a_node_then_add_one(cluster: Any, node: Any, run: str, stop: Any, *, lose_at: int = 10, alone: int = 20,
                             added: list[Any] | None = None) -> None:
    """For a helper thread beside ``recovery.run`` on a ``ray.cluster_utils.Cluster``: kill
    ``node`` once step ``lose_at`` of ``run`` is committed, add a node like it (1 CPU, 1 "slot")
    once the job has committed ``alone`` more steps, then wait for ``stop``. The thread must live
    until the job ends: the added node's processes die with the thread that started them
    (PR_SET_PDEATHSIG); off the main thread, the node gets no SIGTERM handler."""
    from unittest import mock

    import ray

    from ckpt import format as fmt

    lost_at = None
    while not stop.wait(0.05):
        committed = fmt.committed_steps(ckpt.open_storage(run)) if Path(run).is_dir() else []
        if lost_at is None and committed and committed[-1] >= lose_at:
            cluster.remove_node(node, allow_graceful=False)
            lost_at = committed[-1]
        elif lost_at is not None and committed and committed[-1] >= lost_at + alone:
            with mock.patch.object(ray._private.utils, "set_sigterm_handler", lambda _handler: None):
                new = cluster.add_node(num_cpus=1, resources={"slot": 1})
            if added is not None:
                added.append(new)
            stop.wait()
            return
