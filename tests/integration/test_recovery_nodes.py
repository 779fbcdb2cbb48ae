"""Losing a node: a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, two
raylets), one worker and one node agent per node, agents replicating to each other. The second
node's raylet and every process on it are SIGKILLed mid-run; the job must see a node loss (not a
worker crash, not a second failure for the agent), shrink to the surviving node, and restore the
lost node's part of the checkpoint from the replica the surviving agent holds. With policy heal
the survivor keeps its live state instead, its lost peer's replacement cannot be placed (no
room left), and it continues alone without rollback.

Asserts what the job ended with (failure kind, tiers that served the restore, parameters), never
how long anything took.
"""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

import ckpt
from ckpt import format as fmt
from recovery.demo import DemoTrainer
from recovery.detect import NODE_DIED, WORKER_DIED
from tests.helpers import QUICK_NODE_DEATH, lose_a_node_then_add_one

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/dev/shm"),
                                reason="node agents need Linux POSIX shared memory")


@pytest.fixture
def two_nodes():
    yield from _two_nodes()


@pytest.fixture
def two_nodes_quick_to_call_dead():
    yield from _two_nodes(QUICK_NODE_DEATH)  # a lost node's bundles placed again within seconds


def _two_nodes(system_config=None):
    if ray.is_initialized():
        ray.shutdown()
    before = set(os.listdir("/dev/shm"))
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "resources": {"slot": 1},
        **({"_system_config": system_config} if system_config else {})})
    second = cluster.add_node(num_cpus=1, resources={"slot": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        yield cluster, second
    finally:
        ray.shutdown()
        cluster.shutdown()
    leaked = sorted(n for n in set(os.listdir("/dev/shm")) - before if n.startswith("ckrec"))
    assert not leaked, f"agent segments left behind: {leaked}"


def test_lost_node_is_detected_and_its_part_restored_from_a_peer_replica(two_nodes, tmp_path):
    import recovery

    cluster, second = two_nodes
    run = str(tmp_path / "run")
    storage = ckpt.open_storage(run)
    trainer = DemoTrainer(steps=80, width=64, depth=2, global_batch=16, step_sleep_s=0.05, return_state=True)
    killed = threading.Event()
    stop = threading.Event()

    def kill_the_second_node() -> None:
        while not stop.wait(0.02):
            steps = fmt.committed_steps(storage) if os.path.isdir(run) else []
            if steps and steps[-1] >= 10:
                cluster.remove_node(second, allow_graceful=False)
                killed.set()
                return

    killer = threading.Thread(target=kill_the_second_node, daemon=True)
    killer.start()
    try:
        result = recovery.run(
            trainer, num_workers=2, storage=run, echo=None, resources_per_worker={"CPU": 1.0, "slot": 1},
            placement_strategy="SPREAD", agent_replicas=1, every_n_steps=5, keep_last=None,
            heartbeat_interval_s=0.1, backoff_s=0.0, placement_timeout_s=20.0, settle_timeout_s=30.0,
            startup_timeout_s=120.0, agent_memory_bytes=256 << 20, agent_timeout_s=4.0)
    finally:
        stop.set()
        killer.join()
    assert killed.is_set()
    # One failure: the lost agent is part of it, not another one, neither at once nor when its
    # heartbeats stay away for agent_timeout_s.
    assert len(result.failures) == 1, "\n".join(e.format() for e in result.events)
    (rec,) = result.failures
    assert rec.failure.kind == NODE_DIED, rec
    assert (rec.world_before, rec.world_after, result.world_size) == (2, 1, 1)
    step = rec.restore_step
    assert step is not None and step >= 10 and step % 5 == 0
    assert fmt.read_manifest(storage, step).writers == (fmt.writer_name(0), fmt.writer_name(1))
    # The survivor's own snapshot from its agent's memory, the lost node's from the replica its
    # agent received: the chunks themselves never came from storage.
    assert rec.restore_bytes.get("agent memory", 0) > 0, rec
    assert rec.restore_bytes.get("peer", 0) > 0, rec
    assert rec.restore_bytes.get("storage", 0) < min(rec.restore_bytes["agent memory"], rec.restore_bytes["peer"]), rec
    # The coordinator's directory named a holder of each writer's snapshot (the workers were given it)
    plans = [e for e in result.events if e.kind == "restore_plan" and e.fields.get("step") == step]
    assert plans and plans[-1].fields["directory"] == 2, [e.fields for e in plans]
    (out,) = result.returns
    assert (out["world_size"], out["start"]) == (1, step + 1)
    # 2 ranks up to the restored step, then 1.
    final = trainer.reference(world=2, resized=((step + 1, 1),))
    for k, v in final.items():
        torch.testing.assert_close(out["state"][k], v, rtol=1e-4, atol=1e-6)
    # The checkpoints after the loss have one writer, and the job committed to the end.
    last = fmt.committed_steps(storage)[-1]
    assert last == 75 and fmt.read_manifest(storage, last).writers == (fmt.writer_name(0),)


def _every_step_once(result, steps: int) -> list[int]:
    """Every rank's loss log holds every step once; the attempt that trained each."""
    logs = [r["losses"] for r in result.returns]
    assert all(log["steps"] == list(range(steps)) for log in logs), [log["steps"] for log in logs]
    return logs[0]["attempts"]


def test_a_replacement_that_cannot_start_leaves_the_survivors_going_without_rollback(two_nodes, tmp_path):
    import recovery

    cluster, second = two_nodes
    run = str(tmp_path / "run")
    trainer = DemoTrainer(steps=60, width=32, depth=2, global_batch=8, step_sleep_s=0.05, return_state=True,
                          log_losses=True)
    stop = threading.Event()

    def kill_the_second_node() -> None:
        while not stop.wait(0.05):
            steps = fmt.committed_steps(ckpt.open_storage(run)) if os.path.isdir(run) else []
            if steps and steps[-1] >= 10:
                cluster.remove_node(second, allow_graceful=False)
                return

    killer = threading.Thread(target=kill_the_second_node, daemon=True)
    killer.start()
    try:
        result = recovery.run(
            trainer, num_workers=2, min_workers=1, storage=run, echo=None, policy="heal",
            resources_per_worker={"CPU": 1.0, "slot": 1}, placement_strategy="SPREAD", every_n_steps=5,
            keep_last=None, heartbeat_interval_s=0.1, backoff_s=0.0, placement_timeout_s=4.0, settle_timeout_s=30.0,
            startup_timeout_s=120.0, agent_memory_bytes=256 << 20, agent_timeout_s=4.0,
            interrupt_timeout_s=30.0)  # a loaded machine: the survivor's way to a step boundary is slow
    finally:
        stop.set()
        killer.join()
    (rec,) = result.failures
    for e in result.events:  # shown if the assertions below fail
        if e.kind in ("restore_plan", "stopping", "resized"):
            print(e.kind, e.message, e.fields.get("stuck") or "")  # a survivor that did not stop: where it was
    assert rec.failure.kind in (NODE_DIED, WORKER_DIED) and rec.policy == "heal" and rec.steps_lost == 0, \
        [(e.kind, e.message) for e in result.events if e.kind in ("restore_plan", "stopping", "resized")]
    assert (rec.world_before, rec.world_after, result.world_size) == (2, 1, 1)
    resized = [e.fields for e in result.events if e.kind == "resized" and e.fields.get("policy") == "heal"]
    assert resized and resized[0]["world_size"] == 1
    first, second_start = [e.fields for e in result.events if e.kind == "workers_started"]
    # the survivor's own process (its rank renumbered 0 if it was rank 1, on the head node)
    assert second_start["pids"][0] in first["pids"] and second_start["heal"]["receivers"] == []
    attempts = _every_step_once(result, 60)
    healed_at = rec.restore_step
    assert attempts == [0] * (healed_at + 1) + [1] * (59 - healed_at)  # nothing rolled back
    assert [(r["world_size"], r["start"]) for r in result.returns] == [(1, healed_at + 1)]


def _lose_a_node_then_grow(two_nodes, tmp_path, trainer, policy: str, **kw):
    """``recovery.run`` of ``trainer`` on the two nodes while the second is lost and, 20 committed
    steps later, a node like it added (the job allowed to grow back); its result."""
    import recovery

    cluster, second = two_nodes
    run = str(tmp_path / "run")
    stop = threading.Event()
    added = []
    helper = threading.Thread(target=lose_a_node_then_add_one, args=(cluster, second, run, stop),
                              kwargs={"added": added}, daemon=True)
    helper.start()
    try:
        result = recovery.run(
            trainer, num_workers=2, min_workers=1, storage=run, echo=None, policy=policy, allow_grow=True,
            resources_per_worker={"CPU": 1.0, "slot": 1}, placement_strategy="SPREAD", every_n_steps=5,
            keep_last=None, heartbeat_interval_s=0.1, backoff_s=0.0, settle_timeout_s=30.0, startup_timeout_s=120.0,
            placement_timeout_s=10.0,  # a new rank boots on the new node within it (a loaded machine: slow)
            agent_memory_bytes=256 << 20, agent_timeout_s=4.0, **kw)
    finally:
        stop.set()
        helper.join()
    for e in result.events:  # shown if the assertions that follow fail
        if e.kind in ("restore_plan", "stopping", "resized", "workers_started"):
            print(e.kind, e.message)
    assert added, "the job ended before the node was added"
    return result


@pytest.mark.slow
def test_heal_grows_back_in_place_when_a_node_returns(two_nodes_quick_to_call_dead, tmp_path):
    # The second node is lost, its rank's replacement cannot be placed and the survivor goes on
    # alone (as above); then a new node joins, Ray places the lost bundle there, and after the
    # next checkpoint the job grows back to 2 in place: the survivor keeps its process, the new
    # rank copies its live state, nothing is rolled back.
    steps = 400
    trainer = DemoTrainer(steps=steps, width=32, depth=2, global_batch=8, step_sleep_s=0.05, return_state=True,
                          log_losses=True)
    result = _lose_a_node_then_grow(two_nodes_quick_to_call_dead, tmp_path, trainer, "heal", interrupt_timeout_s=30.0)
    first, alone, grown = [e.fields for e in result.events if e.kind == "workers_started"]
    assert (first["world_size"], alone["world_size"], grown["world_size"], result.world_size) == (2, 1, 2, 2)
    # the survivor's own process all along; the new rank received its live state
    assert alone["pids"][0] in first["pids"] and grown["pids"][0] == alone["pids"][0]
    assert grown["kept"] == [0] and grown["heal"]["receivers"] == [1] and grown["heal"]["source"] == 0
    (plan,) = [e.fields for e in result.events if e.kind == "restore_plan" and e.fields.get("grow")]
    assert plan["chosen"] == "heal"
    attempts = _every_step_once(result, steps)
    assert attempts == sorted(attempts) and attempts[-1] == 2  # nothing redone: each step by one attempt
    grown_at = grown["heal"]["step"] + 1
    assert [(r["world_size"], r["start"]) for r in result.returns] == [(2, grown_at), (2, grown_at)]
    torch.testing.assert_close(result.returns[0]["state"], result.returns[1]["state"], rtol=0, atol=0)


@pytest.mark.slow
def test_reload_grows_back_in_place_after_shrinking_when_a_node_returns(two_nodes_quick_to_call_dead, tmp_path):
    # Under reload the node loss restarts the job on a placement group of 1; when a new node joins,
    # a group of its own is reserved for the new rank there and the job grows back to 2 with the
    # shrunk job's worker kept in its process, both ranks restoring the checkpoint just committed.
    trainer = DemoTrainer(steps=400, width=32, depth=2, global_batch=8, step_sleep_s=0.05, return_state=True)
    result = _lose_a_node_then_grow(two_nodes_quick_to_call_dead, tmp_path, trainer, "reload")
    first, alone, grown = [e.fields for e in result.events if e.kind == "workers_started"]
    assert (first["world_size"], alone["world_size"], grown["world_size"], result.world_size) == (2, 1, 2, 2)
    assert grown["kept"] == [0] and grown["pids"][0] == alone["pids"][0]  # the shrunk job's worker, kept
    (growing,) = [e.fields for e in result.events if e.kind == "resized" and e.fields.get("grow")]
    assert growing["policy"] == "reload" and growing["bundles"] == {1: 1}  # the reserved group's bundle
    shrunk_at, grown_at = alone["restore_step"], grown["restore_step"]
    assert shrunk_at >= 10 and grown_at >= shrunk_at + 20 and grown_at % 5 == 0
    assert [(r["world_size"], r["start"]) for r in result.returns] == [(2, grown_at + 1)] * 2
    torch.testing.assert_close(result.returns[0]["state"], result.returns[1]["state"], rtol=0, atol=0)
    expected = trainer.reference(world=2, resized=((shrunk_at + 1, 1), (grown_at + 1, 2)))
    for k, v in expected.items():
        torch.testing.assert_close(result.returns[0]["state"][k], v, rtol=1e-4, atol=1e-6)
