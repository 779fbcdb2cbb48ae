"""The Checkpointer when host memory runs out: a stuck storage holds the only buffer, a save
waits for it up to ``buffer_wait_timeout_s`` and fails alone, and ``interrupt()`` ends the wait."""

from __future__ import annotations

import threading

import pytest

import ckpt
from ckpt.storage import LocalStorage, Storage
from tests.helpers import DelegatingStorage
from tests.unit.test_checkpointer import make_job, train


class GatedStorage(DelegatingStorage):
    """Writes wait until the gate opens (a storage that hangs)."""

    def __init__(self, inner: Storage):
        super().__init__(inner)
        self.gate = threading.Event()

    def write(self, path, parts, *, durable=True):
        self.gate.wait(60)
        self.inner.write(path, parts, durable=durable)


def _one_buffer_on_stuck_storage(tmp_path, wait_s: float):
    """A Checkpointer whose storage holds writes until ``gate`` is set, and whose host budget
    holds exactly one snapshot, taken at step 0 (its write stuck); trained to step 1."""
    model, opt, sched, loader, state = make_job()
    train(model, opt, sched, loader, range(1))
    stuck = GatedStorage(LocalStorage(str(tmp_path)))
    ck = ckpt.Checkpointer(stuck, every_n_steps=1, keep_last=None, buffer_wait_timeout_s=wait_s)
    ck.attach(opt)
    first = ck.save(0, state)
    ck.pool.budget = first.nbytes + 64  # room for exactly one snapshot in flight (testing only)
    train(model, opt, sched, loader, [1])
    return (model, opt, sched, loader, state), stuck, ck, first


def test_a_stuck_storage_fails_the_checkpoint_after_buffer_wait_timeout_and_training_goes_on(tmp_path):
    (model, opt, sched, loader, state), stuck, ck, first = _one_buffer_on_stuck_storage(tmp_path, 0.3)
    try:
        second = ck.save(1, state)  # the first still holds the only buffer: waits 0.3 s, then gives up
        with pytest.raises(ckpt.CkptError, match="no host buffer came free within 0.3 s"):
            second.committed.result(10)
        assert not first.committed.done()
        train(model, opt, sched, loader, [2])  # training went on
        stuck.gate.set()
        assert first.committed.result(60) is not None
        ck.save(3, state).committed.result(60)  # and checkpoints work again once storage does
        assert ck.status().failed == 1
    finally:
        stuck.gate.set()
        ck.close()
    assert ckpt.committed_steps(ckpt.open_storage(tmp_path)) == [0, 3]
    with pytest.raises(ValueError, match="buffer_wait_timeout_s"):
        ckpt.CheckpointerConfig(url="/tmp/x", buffer_wait_timeout_s=0)


def test_interrupt_ends_a_save_waiting_for_host_memory(tmp_path):
    """``interrupt()`` from another thread: a save blocked on a full host budget (storage stuck,
    or a commit that a lost peer stalls) returns at once, its checkpoint skipped; the next save
    waits again as usual."""
    (_model, _opt, _sched, _loader, state), stuck, ck, first = _one_buffer_on_stuck_storage(tmp_path, 120.0)
    try:
        out: list = []
        saving = threading.Thread(target=lambda: out.append(ck.save(1, state)))
        saving.start()
        saving.join(0.3)
        assert saving.is_alive()  # it waits for the first snapshot's buffer
        ck.interrupt()
        saving.join(30)
        assert not saving.is_alive() and out[0].skipped and ck.status().skipped == 1
        ck.interrupt()  # no save waits now: the next one that would wait gives up at once
        assert ck.save(2, state).skipped
        stuck.gate.set()
        assert first.committed.result(60) is not None
        ck.save(3, state).committed.result(60)  # the interrupt is spent: saves wait and land again
    finally:
        stuck.gate.set()
        ck.close()
    assert ckpt.committed_steps(ckpt.open_storage(tmp_path)) == [0, 3]
