"""The committing agent of a told run (``agent.daemon.heard.FragmentsHeard``, what
``ckpt.commit.complete`` waits on): the notice ends the wait and each fragment is read once; a
failure in the notice fails the commit naming the writer; without a notice storage is looked at
rarely and still completes the commit; a stopping agent stops waiting."""

from __future__ import annotations

import collections
import sys
import threading

import pytest
import torch

from agent.daemon.heard import FragmentsHeard, PersistNotice
from ckpt.commit import complete, persist
from ckpt.errors import CommitError
from ckpt.format import writer_name
from ckpt.plan import plan_save
from ckpt.storage import LocalStorage

W = 3
WRITERS = [writer_name(r) for r in range(W)]


def _persist_all(storage, step: int, save: str, ranks=range(W)) -> None:
    state = {f"w{i}": torch.full((4, 3), float(i)) for i in range(6)}
    for r in ranks:
        persist(storage, plan_save(state, rank=r, world=W), step=step, writer=WRITERS[r], save=save, threads=1,
                durable=False)


@pytest.fixture
def reads(monkeypatch):
    module = sys.modules["ckpt.commit"]
    counter: collections.Counter = collections.Counter()
    real = module.read_fragment

    def counting(storage, step, writer, **kw):
        counter[writer] += 1
        return real(storage, step, writer, **kw)

    monkeypatch.setattr(module, "read_fragment", counting)
    return counter


def test_the_notice_ends_the_wait_and_each_fragment_is_read_once(tmp_path, reads):
    storage = LocalStorage(str(tmp_path))
    _persist_all(storage, 2, "s2")
    notice = PersistNotice()
    notice.wake.set()  # told before the commit began: it does not look at storage first
    heard = FragmentsHeard(storage, 2, notice, (600.0, 600.0), threading.Event())
    manifest = complete(storage, 2, "s2", WRITERS, committer=True, timeout_s=30, signals=heard)
    assert manifest.save_id == "s2" and manifest.writers == tuple(WRITERS)
    assert dict(reads) == {w: 1 for w in WRITERS}


def test_a_failure_in_the_notice_fails_the_commit_naming_the_writer(tmp_path):
    storage = LocalStorage(str(tmp_path))
    _persist_all(storage, 2, "s2", ranks=(0, 2))
    notice = PersistNotice(error="rank00001: OSError: disk full")
    notice.wake.set()
    heard = FragmentsHeard(storage, 2, notice, (600.0, 600.0), threading.Event())
    with pytest.raises(CommitError, match="rank00001: OSError: disk full"):
        complete(storage, 2, "s2", WRITERS, committer=True, timeout_s=30, signals=heard)


def test_without_a_notice_storage_is_looked_at_rarely_and_the_commit_completes(tmp_path):
    storage = LocalStorage(str(tmp_path))
    _persist_all(storage, 2, "s2", ranks=(0, 1))
    heard = FragmentsHeard(storage, 2, PersistNotice(), (0.01, 0.02), threading.Event())
    late = threading.Timer(0.1, lambda: _persist_all(storage, 2, "s2", ranks=(2,)))  # its trainer died untold
    late.start()
    try:
        manifest = complete(storage, 2, "s2", WRITERS, committer=True, timeout_s=30, signals=heard)
    finally:
        late.join()
    assert manifest.save_id == "s2"


def test_a_stopping_agent_stops_waiting(tmp_path):
    storage = LocalStorage(str(tmp_path))
    stop = threading.Event()
    stop.set()
    heard = FragmentsHeard(storage, 2, PersistNotice(), (600.0, 600.0), stop)
    assert heard.wait_persisted("s2", WRITERS, timeout_s=600, poll_s=0.05) == (WRITERS, {})
