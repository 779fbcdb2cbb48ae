"""A restore at a real shape under ``recovery.run``: workers training a state of Llama-70B's
shape with tiny tensors (80 layers x 9 weights and Adam's two moments: 2,160 arrays, data-parallel
on gloo), one worker SIGKILLed. Every worker must restore from its node agent's memory, read
nothing from storage, report no fallback, and come back bit for bit; the agent's listing must fit
its messages (streamed, one snapshot a message, documents by reference past the inline limit),
where the whole answer in one message would not. 8 workers x 2,160 arrays is marked slow; the
default suite runs 4 workers of the same 2,160 arrays.

Asserts counts, sizes and values, never times.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from ckpt.format import writer_name
from examples.llama_shaped import WEIGHTS, LlamaShapedTrainer, digest
from recovery import events as ev
from recovery.detect import WORKER_DIED

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/dev/shm"),
                                reason="node agents need Linux POSIX shared memory")

FAST = {"heartbeat_interval_s": 0.1, "backoff_s": 0.0, "placement_timeout_s": 5.0, "settle_timeout_s": 60.0,
        "startup_timeout_s": 300.0, "hang_timeout_s": 120.0, "agent_memory_bytes": 512 << 20, "echo": None}

MESSAGE_LIMIT, SLACK = 16 << 20, 4096  # the agent's max_message_bytes (its default), framing


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    before = set(os.listdir("/dev/shm"))
    yield
    ray.shutdown()
    leaked = sorted(n for n in set(os.listdir("/dev/shm")) - before if n.startswith("ckrec"))
    assert not leaked, f"agent segments left behind: {leaked}"


@dataclass(frozen=True, slots=True)
class ListingProbe(LlamaShapedTrainer):
    """The trainer, and on rank 0 of the restarted attempt, right after its restore, the sizes
    of the node agent's listing: each streamed message as the restore asks for it, and what the
    one-message answer with every document inline would have been (the agent refuses it)."""

    def restore(self, ctx: Any, state: dict[str, Any]) -> int:
        start = LlamaShapedTrainer.restore(self, ctx, state)
        if ctx.attempt == 1:
            ctx.source = type(ctx.checkpointer.last_restore_source).__name__
        if ctx.rank == 0 and ctx.attempt == 1:
            ctx.listing = _listing_sizes(ctx.checkpointer.sink)
        return start

    def __call__(self, ctx: Any) -> dict[str, Any]:
        return {**LlamaShapedTrainer.__call__(self, ctx), "listing": getattr(ctx, "listing", None),
                "source": getattr(ctx, "source", None)}


def _listing_sizes(sink: Any) -> dict[str, Any]:
    import grpc

    from agent.pb import pb
    from agent.trainer.sink import _RESTORE_DOCUMENTS

    c = sink.client
    table = c.step_table(sink.run_url, 5)
    streamed = [(i.key.writer, i.key.step, i.ByteSize())
                for i in c.stream_snapshots(sink.run_url, documents=_RESTORE_DOCUMENTS)]
    try:
        whole = c.trainer.ListSnapshots(pb.ListSnapshotsRequest(run_url=sink.run_url, with_plans=True),
                                        timeout=600.0).ByteSize()
        refused = None
    except grpc.RpcError as e:
        m = re.search(r"would be (\d+) bytes", e.details() or "")
        whole, refused = (int(m.group(1)) if m else None), e.code().name
    return {"streamed": streamed, "whole": whole, "refused": refused,
            "table": None if table is None else (len(table.paths.split(b"\n")), table.ByteSize())}


def _restore_from_agent_memory(tmp_path, workers: int, layers: int) -> None:
    import recovery

    trainer = ListingProbe(steps=12, layers=layers, kill_at=8, kill_rank=workers - 1)
    arrays = 3 * len(WEIGHTS) * layers
    result = recovery.run(trainer, num_workers=workers, storage=str(tmp_path / "run"),
                          resources_per_worker={"CPU": 2 / workers}, every_n_steps=5, keep_last=None,
                          max_failures=1, **FAST)
    assert len(result.failures) == 1, [(e.kind, e.message) for e in result.events]
    (rec,) = result.failures
    assert rec.failure.kind == WORKER_DIED and rec.failure.ranks == (workers - 1,), rec.failure
    assert rec.restore_step == 5 and result.attempts == 2
    returns = sorted(result.returns, key=lambda r: r["rank"])
    assert [(r["attempt"], r["start"]) for r in returns] == [(1, 6)] * workers
    # bit for bit: the restored state is the state after step 5, the end state that of a run
    # that never failed
    at5, end = digest(trainer.reference(6, workers)), digest(trainer.reference(12, workers))
    assert [r["restored_digest"] for r in returns] == [at5] * workers
    assert [r["final_digest"] for r in returns] == [end] * workers
    # every worker read every byte of the state from agent memory, nothing from storage
    state_bytes = 3 * len(WEIGHTS) * layers * trainer.rows * trainer.cols * 4
    for r in returns:
        report = r["restore"]
        assert report["step"] == 5 and report["fallbacks"] == [], report
        assert report["bytes"] == {"agent memory": state_bytes, "peer": 0, "storage": 0}, (arrays, report)
    assert rec.restore_bytes == {"agent memory": workers * state_bytes, "peer": 0, "storage": 0}
    assert rec.restored_from == "agent memory" and rec.fallbacks == [] and result.restore_fallbacks == []
    assert not [e for e in result.events if e.kind == ev.RESTORE_FALLBACK]
    # every rank restored from its node agent's one table of step 5 (GetStepTable), not a listing
    assert [r["source"] for r in returns] == ["TableSource"] * workers
    table_arrays, table_bytes = returns[0]["listing"]["table"]
    assert table_arrays == arrays and table_bytes + SLACK <= MESSAGE_LIMIT
    # the listing the restores read: a snapshot of step 5 of every writer of the node, one
    # message each, far below the limit; the answer in one message, where it would not fit, is
    # refused (RESOURCE_EXHAUSTED), never cut
    listing = returns[0]["listing"]
    sizes = [n for _, _, n in listing["streamed"]]
    assert {(w, 5) for w, _, _ in listing["streamed"]} >= {(writer_name(r), 5) for r in range(workers)}, listing
    assert max(sizes) + SLACK <= MESSAGE_LIMIT, listing
    too_large = listing["whole"] + SLACK > MESSAGE_LIMIT
    assert listing["refused"] == ("RESOURCE_EXHAUSTED" if too_large else None), listing
    print(f"\n{workers} workers x {arrays} arrays: listing {len(sizes)} messages, largest {max(sizes)} B, in one message {listing['whole']} B ({listing['refused'] or 'sent'}); "
          f"step table {table_bytes} B; restore {rec.restore_s:.2f} s, resumed {rec.resumed_after_s:.2f} s after detection")


def test_four_workers_of_2160_arrays_restore_from_agent_memory_bit_exact(cluster, tmp_path):
    _restore_from_agent_memory(tmp_path, workers=4, layers=80)


@pytest.mark.slow
def test_eight_workers_of_2160_arrays_restore_from_agent_memory_bit_exact(cluster, tmp_path):
    _restore_from_agent_memory(tmp_path, workers=8, layers=80)
