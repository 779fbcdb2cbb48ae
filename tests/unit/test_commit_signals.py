"""Writers and committer told through the job's key-value store (``ckpt.signals``), over a real
c10d TCPStore on loopback: the committer never polls storage for fragments or failure markers,
each non-committer reads the commit point once, a failed writer ends the wait at once, a
closed writer stops waiting, and a store that is gone sends everybody back to storage."""

from __future__ import annotations

import collections
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from ckpt.commit import complete, persist
from ckpt.errors import CommitError
from ckpt.format import writer_name
from ckpt.plan import plan_save
from ckpt.signals import CLOSED, OK, CommitSignals, StoreUnusable
from ckpt.storage import LocalStorage, StorageWrapper

W = 4


class Reads(StorageWrapper):
    def __init__(self, inner):
        super().__init__(inner)
        self.reads = collections.Counter()
        self.lock = threading.Lock()

    def read(self, path):
        with self.lock:
            self.reads[path] += 1
        return super().read(path)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def stores():
    port = _port()
    master = dist.TCPStore("127.0.0.1", port, W, True, timedelta(seconds=30), wait_for_workers=False)
    clients = [master] + [dist.TCPStore("127.0.0.1", port, W, False, timedelta(seconds=30)) for _ in range(W - 1)]
    yield clients
    del clients, master


def _signals(stores, run="r1"):
    return [CommitSignals(stores[r], f"ckpt/{run}", writer_name(r)) for r in range(W)]


def _state(rank):
    return {f"w{i}": torch.full((2, 3), float(rank * 100 + i)) for i in range(6)} if rank == 0 else {}


def test_a_save_commits_with_one_read_per_document_and_no_polling(tmp_path, stores):
    storage = Reads(LocalStorage(str(tmp_path / "run")))
    signals = _signals(stores)
    writers = [writer_name(r) for r in range(W)]
    state = {f"w{i}": torch.full((4, 3), float(i)) for i in range(8)}

    def writer(rank):
        plan = plan_save(state, rank=rank, world=W)
        frag = persist(storage, plan, step=3, writer=writers[rank], save="s3", threads=2, durable=False)
        signals[rank].persisted("s3")
        return complete(storage, 3, "s3", writers, committer=rank == 0, timeout_s=30, poll_s=0.01,
                        known={writers[rank]: frag}, signals=signals[rank])

    with ThreadPoolExecutor(W) as pool:
        manifests = list(pool.map(writer, range(W)))
    assert {m.save_id for m in manifests} == {"s3"}
    commit_point = "000000000003/zarr.json"
    frags = [p for p in storage.reads if p.startswith("000000000003/.fragments/")]
    assert storage.reads[commit_point] == W  # each non-committer once, after it heard; the committer looks first
    assert sorted(frags) == sorted(f"000000000003/.fragments/{w}.json" for w in writers[1:])
    assert all(storage.reads[p] == 1 for p in frags)  # each fragment read once; no failure marker read
    assert not any(p.endswith(".failed") for p in storage.reads)
    assert stores[0].num_keys() <= 2  # what the save left in the store: nothing but c10d's own


def test_a_failed_writer_ends_the_wait_and_every_writer_hears_why(stores):
    s = _signals(stores, "r2")
    s[1].persisted("x")
    s[2].persisted("x", "rank2: OSError: disk full")
    missing, errors = s[0].wait_persisted("x", [writer_name(r) for r in range(W)], timeout_s=30, poll_s=0.01)
    assert missing == [writer_name(0), writer_name(3)] and errors == {writer_name(2): "rank2: OSError: disk full"}
    s[0].committed("x", [writer_name(r) for r in range(W)], error="CommitError: a writer failed")
    assert s[3].wait_committed("x", timeout_s=5) == "failed: CommitError: a writer failed"
    s[0].committed("y", [writer_name(r) for r in range(W)])
    assert s[1].wait_committed("y", timeout_s=5) == OK


def test_a_closed_writer_stops_waiting_and_silence_is_a_timeout(stores):
    s = _signals(stores, "r3")
    got = []
    t = threading.Thread(target=lambda: got.append(s[1].wait_committed("z", timeout_s=60)))
    t.start()
    s[1].wake("z")
    t.join(10)
    assert got == [CLOSED]
    assert s[2].wait_committed("never", timeout_s=0.2) is None
    missing, errors = s[0].wait_persisted("never", [writer_name(0)], timeout_s=0.1, poll_s=0.01)
    assert missing == [writer_name(0)] and errors == {}


def test_a_store_that_is_gone_sends_the_writers_to_storage(tmp_path):
    port = _port()
    master = dist.TCPStore("127.0.0.1", port, 2, True, timedelta(seconds=5), wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", port, 2, False, timedelta(seconds=5))
    s = CommitSignals(client, "ckpt/r4", writer_name(1))
    s._waiter = client.clone()  # as CommitSignals.of connects it, while rank 0 serves
    del master  # rank 0's process is gone
    with pytest.raises(StoreUnusable):
        s.wait_committed("q", timeout_s=5)
    s.persisted("q")  # best effort: no raise
    storage = LocalStorage(str(tmp_path / "run"))
    with pytest.raises(CommitError, match="not committed"):  # then storage decides
        complete(storage, 9, "q", [writer_name(0), writer_name(1)], committer=False, timeout_s=0.2, poll_s=0.05,
                 signals=s)
