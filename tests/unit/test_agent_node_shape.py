"""A node at real shape, in process: 16 ranks on one node, each saving its Shard(0) slice of
2,200 arrays (600 in the default suite) through the node agent, with the agents' message limit at 1 MiB and the inline
limit at 64 KiB (a rank's plan is several times the inline limit, the node's listing many times
a message). Every rank then restores from its node agent's memory, and every rank of a node
whose agent holds nothing restores from the ring's peer: nothing from storage, no fallback,
every value bit for bit, no message over the limit, and the ring listed once for the node's
ranks that restore together, not once per rank. Ranks are threads sharing a broadcast
(the Checkpointer's only collective), so the test needs no process group. Asserts counts and
values, never times.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

import ckpt
from agent.config import AgentConfig
from agent.pb import pb
from agent.trainer.client import AgentClient
from ckpt.restore import Tier
from ckpt.testing.threads import thread_groups

RANKS = 16
LIMIT, INLINE = 1 << 20, 64 << 10
SMALL = {"max_message_bytes": LIMIT, "inline_document_bytes": INLINE, "stream_chunk_bytes": 256 << 10}


def _groups() -> list:
    return thread_groups(RANKS, timeout_s=120)


def _full(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(2 * RANKS, 3, generator=g)  # rows split 16 ways: 2 rows per rank


def _state(rank: int, full: list[torch.Tensor], *, zeros: bool = False) -> dict[str, Any]:
    return {f"layers.{i}.w": ckpt.Sharded(torch.zeros(2, 3) if zeros else t[2 * rank: 2 * rank + 2].clone(),
                                          dim=0, rank=rank, world=RANKS) for i, t in enumerate(full)}


def _agents(tmp_path, names: tuple[str, ...]) -> dict[str, Any]:
    from agent.daemon import AgentDaemon

    shm = tmp_path / "shm"
    shm.mkdir(exist_ok=True)
    out = {}
    for name in names:
        d = AgentDaemon(AgentConfig(socket_path=str(tmp_path / f"{name}.sock"), memory_budget_bytes=256 << 20,
                                    shm_dir=str(shm), shm_prefix=f"node16{name}", log_format="text", token="t",
                                    peer_listen="127.0.0.1:0", peer_dead_after_s=60, **SMALL))
        d.start()
        out[name] = d
    return out


@pytest.mark.parametrize("arrays", [600, pytest.param(2200, marks=pytest.mark.slow)])
def test_sixteen_ranks_of_a_node_restore_from_agent_memory_and_from_the_peer(tmp_path, arrays):
    full = [_full(i) for i in range(arrays)]
    agents = _agents(tmp_path, ("a", "b"))
    a, b = agents["a"], agents["b"]
    try:
        ring = [a.config.self_address, b.config.self_address]
        a.set_ring(ring, 0)  # no replicas: node b holds nothing, its ranks must fetch from a
        b.set_ring(ring, 0)
        run = str(tmp_path / "run")
        groups = _groups()

        def save(rank: int) -> int:
            with ckpt.Checkpointer(run, agent=f"unix://{tmp_path / 'a.sock'}", keep_last=None,
                                   process_group=groups[rank]) as c:
                return c.save(1, _state(rank, full), force=True).result(600).step

        with ThreadPoolExecutor(RANKS) as pool:
            assert list(pool.map(save, range(RANKS))) == [1] * RANKS  # every rank saw the commit

        # the node's listing: 16 snapshots, each message under the limit, plans by reference
        with AgentClient(f"unix://{tmp_path / 'a.sock'}") as client:
            infos = [i for i in client.stream_snapshots("", documents=[pb.DOCUMENT_KIND_CHUNK_INDEX])
                     if i.key.run_url]
        assert len(infos) == RANKS and all(i.ByteSize() < LIMIT for i in infos)
        held = [s for s in a.agent.snapshots() if s.state == ckpt.SnapshotState.COMMITTED]
        assert len(held) == RANKS and all(len(s.plan_json) > INLINE for s in held)
        assert sum(len(s.plan_json) for s in held) > 2 * LIMIT  # the node's plans in one answer would not fit

        def restore(node: str, rank: int) -> tuple[bool, dict[Tier, int], tuple]:
            dest = _state(rank, full, zeros=True)
            with ckpt.Checkpointer(run, agent=f"unix://{tmp_path / f'{node}.sock'}", keep_last=None,
                                   process_group=groups[rank]) as c:
                assert c.restore(dest) == 2
                report = c.last_restore
            exact = all(torch.equal(dest[f"layers.{i}.w"].tensor, t[2 * rank: 2 * rank + 2]) for i, t in enumerate(full))
            return exact, dict(report.served), report.fallbacks

        per_rank = arrays * 2 * 3 * 4
        ring_listings = []
        list_ring = b.replicator._list_ring
        b.replicator._list_ring = lambda *a: ring_listings.append(a) or list_ring(*a)
        for node, tier in (("a", Tier.AGENT_MEMORY), ("b", Tier.PEER)):
            groups = _groups()
            with ThreadPoolExecutor(RANKS) as pool:
                results = list(pool.map(lambda r, n=node: restore(n, r), range(RANKS)))
            for rank, (exact, served, fallbacks) in enumerate(results):
                assert exact, (node, rank)
                assert served[Tier.STORAGE] == 0 and served[tier] == per_rank, (node, rank, served)
                assert fallbacks == (), (node, rank, fallbacks)
        # node b's 16 ranks restoring together asked the ring once (or a few times), not once each
        assert 1 <= len(ring_listings) < RANKS // 2, len(ring_listings)
        answered_too_large = sum(d.agent.metrics.restore_fallbacks.labels(r)._value.get()
                                 for d in (a, b) for r in ("answer_too_large", "peer_unreachable", "peer_fetch_failed"))
        assert answered_too_large == 0
    finally:
        for d in (a, b):
            d.stop()
