"""A restore that reads what its node agent does not hold asks the ring only for the writers it
reads, and, with a directory of who holds what (``holders``: the coordinator's, from one listing
of every agent), only their holders: not every agent of the ring once per node.

Three agents in a ring without replicas: rank 0 saves through agent ``a``, rank 1 through ``b``;
rank 1 then restores on ``c`` (a replacement node holding nothing) while rank 0 restores on
``a``. Ranks are threads sharing the Checkpointer's one collective. Asserts which agents were
dialled, what was fetched and from where every byte came.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

import ckpt
from agent.config import AgentConfig
from ckpt.restore import FallbackReason, Tier
from ckpt.testing.threads import thread_groups

WORLD, ARRAYS = 2, 12


def _full() -> list[torch.Tensor]:
    return [torch.randn(2 * WORLD, 5, generator=torch.Generator().manual_seed(i)) for i in range(ARRAYS)]


def _state(rank: int, full: list[torch.Tensor], *, zeros: bool = False) -> dict[str, Any]:
    return {f"w{i}": ckpt.Sharded(torch.zeros(2, 5) if zeros else t[2 * rank: 2 * rank + 2].clone(), dim=0,
                                  rank=rank, world=WORLD) for i, t in enumerate(full)}


@pytest.fixture
def ring(tmp_path):
    from agent.daemon import AgentDaemon

    shm = tmp_path / "shm"
    shm.mkdir()
    agents = {}
    for name in "abc":
        d = AgentDaemon(AgentConfig(socket_path=str(tmp_path / f"{name}.sock"), memory_budget_bytes=64 << 20,
                                    shm_dir=str(shm), shm_prefix=f"ckdir{name}", log_format="text", token="t",
                                    peer_listen="127.0.0.1:0", peer_dead_after_s=60))
        d.start()
        agents[name] = d
    addresses = [agents[n].config.self_address for n in "abc"]
    for d in agents.values():
        d.set_ring(addresses, 0)  # no replicas: only b holds rank 1's snapshot
    try:
        yield agents
    finally:
        for d in agents.values():
            d.stop()


def _save(tmp_path, full, consolidate: str = "never") -> str:
    run = str(tmp_path / "run")
    groups = thread_groups(WORLD, timeout_s=60)

    def save(rank: int) -> int:
        # consolidate="never": the step stays in per-writer packs, as a running job's newest step;
        # "kept": the last step is consolidated into zarr shards as the Checkpointer closes (its
        # commit point keeps who wrote each chunk: the same holders are asked)
        with ckpt.Checkpointer(run, agent=f"unix://{tmp_path / 'ab'[rank]}.sock", keep_last=None,
                               consolidate=consolidate, process_group=groups[rank]) as c:
            return c.save(1, _state(rank, full), force=True).result(120).step

    with ThreadPoolExecutor(WORLD) as pool:
        assert list(pool.map(save, range(WORLD))) == [1, 1]
    return run


def _restore(tmp_path, run, full, holders) -> list[tuple[bool, dict, tuple]]:
    groups = thread_groups(WORLD, timeout_s=60)

    def restore(rank: int) -> tuple[bool, dict, tuple]:
        dest = _state(rank, full, zeros=True)
        with ckpt.Checkpointer(run, agent=f"unix://{tmp_path / 'ac'[rank]}.sock", keep_last=None,
                               process_group=groups[rank]) as c:
            if holders is not None:
                c._restore_source = lambda step=None: c.sink.restore_source(c.storage, holders=holders, step=step)
            assert c.restore(dest, step=1) == 2
            report = c.last_restore
        exact = all(torch.equal(dest[f"w{i}"].tensor, t[2 * rank: 2 * rank + 2]) for i, t in enumerate(full))
        return exact, dict(report.served), tuple(f.reason for f in report.fallbacks)

    with ThreadPoolExecutor(WORLD) as pool:
        return list(pool.map(restore, range(WORLD)))


@pytest.mark.parametrize("directory", ["none", "holders", "nobody_holds_it", "holders_consolidated"])
def test_a_restore_asks_the_ring_only_for_the_writers_it_reads_and_only_their_holders(tmp_path, ring, directory):
    full = _full()
    run = _save(tmp_path, full, consolidate="kept" if directory == "holders_consolidated" else "never")
    assert ckpt.read_manifest(ckpt.open_storage(run), 1).layout == (
        "shards" if directory == "holders_consolidated" else "packs")
    a, b, c = ring["a"], ring["b"], ring["c"]
    both = {"rank00000": (a.config.self_address,), "rank00001": (b.config.self_address,)}
    holders = {"none": None, "holders": both, "holders_consolidated": both,
               "nobody_holds_it": {"rank00000": (a.config.self_address,)}}[directory]
    dialled: dict[str, list[list[str]]] = {n: [] for n in "abc"}
    for name, d in ring.items():
        real = d.replicator._list_ring
        d.replicator._list_ring = lambda run_url, kinds, peers, _n=name, _r=real: (
            dialled[_n].append(sorted(peers)) or _r(run_url, kinds, peers))
    results = _restore(tmp_path, run, full, holders)
    per_rank = ARRAYS * 2 * 5 * 4
    assert [r[0] for r in results] == [True, True]
    # rank 0 on a: its own snapshot, in a's memory; nobody dialled for it
    assert results[0][1][Tier.AGENT_MEMORY] == per_rank and results[0][1][Tier.STORAGE] == 0
    assert dialled["a"] == [] and dialled["b"] == []
    fetched = c.agent.snapshots()
    if directory == "nobody_holds_it":
        # the directory names no holder of rank 1's snapshot: nobody is dialled, storage serves
        assert dialled["c"] == []
        assert results[1][1][Tier.STORAGE] == per_rank + ARRAYS * 4  # each chunk with its crc32c
        assert FallbackReason.NOT_HELD in results[1][2]
        assert fetched == []
        return
    assert results[1][1][Tier.PEER] == per_rank and results[1][1][Tier.STORAGE] == 0 and results[1][2] == ()
    # without a directory every other agent of the ring is asked; with one, only b, which holds it
    want = sorted([a.config.self_address, b.config.self_address]) if directory == "none" else [b.config.self_address]
    assert dialled["c"] == [want]
    # only the snapshot rank 1 reads was copied to c: rank 0's (listed by a) was not
    assert [(s.writer, s.step) for s in fetched] == [("rank00001", 1)]


def test_the_ring_is_asked_for_the_steps_a_listing_names(tmp_path, ring):
    from agent.trainer.client import AgentClient

    run = ckpt.open_storage(_save(tmp_path, _full())).url  # as the agents know it

    with AgentClient(f"unix://{tmp_path / 'c.sock'}") as client:
        listed = {step: [(i.key.writer, i.key.step) for i in client.stream_snapshots(
            run, include_peers=True, steps=[step]) if i.key.run_url] for step in (1, 2)}
    assert sorted(listed[1]) == [("rank00000", 1), ("rank00001", 1)] and listed[2] == []
