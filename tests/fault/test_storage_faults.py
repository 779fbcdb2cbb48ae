"""Storage faults injected through a wrapper fsspec filesystem (``faulty://``): retried, or
reported with training going on; never a corrupt committed checkpoint. Every test asserts on
what landed in the wrapped directory, read without faults."""

from __future__ import annotations

import errno

import pytest

import ckpt
from ckpt.verify import verify_step

from .fault_schedule import RETRY, check_run, empty_state, equal_state, one_run, state_at
from .faultfs import FaultPlan, faulty_url


def _checkpointer(root, plan, **kw):
    opts = dict(every_n_steps=1, keep_last=None, storage_options={"faults": plan}, retry=RETRY, max_chunk_bytes=1024,
                io_threads=4, commit_timeout_s=30)
    return ckpt.Checkpointer(faulty_url(root), **(opts | kw))


def test_faulty_filesystem_is_an_fsspec_filesystem(tmp_path):
    import fsspec

    fs, path = fsspec.core.url_to_fs(faulty_url(tmp_path / "x"), faults=FaultPlan())
    assert isinstance(fs, fsspec.AbstractFileSystem) and fs.protocol == "faulty" and path == str(tmp_path / "x")
    storage = ckpt.open_storage(faulty_url(tmp_path / "x"), storage_options={"faults": FaultPlan()})
    assert type(storage.inner).__name__ == "FsspecStorage"


@pytest.mark.parametrize("layout", ["chunks", "packs"])
def test_transient_errors_partial_writes_and_lost_answers_are_retried(tmp_path, layout):
    plan = FaultPlan(seed=3, transient=0.15, partial=0.1, ghost=0.05, latency=0.1, max_latency_s=0.002)
    ck = _checkpointer(tmp_path / "run", plan, layout=layout)
    steps = 12 if layout == "chunks" else 24  # packs: a few writes per checkpoint, so more checkpoints
    handles = [ck.save(s, state_at(s)) for s in range(steps)]
    ck.wait()
    ck.close()
    assert [h.state.value for h in handles] == ["committed"] * steps
    assert ck.status().errors == ()
    if layout == "chunks":
        assert plan.injected["transient"] > 10 and plan.injected["partial"] > 5 and plan.injected["ghost"] > 2
    else:  # every kind of fault, on far fewer writes
        assert plan.injected["transient"] > 10 and plan.injected["partial"] + plan.injected["ghost"] > 3
    figures = check_run(tmp_path / "run", expected_committed=set(range(steps)))
    assert figures == {"committed": steps, "incomplete_removed": 0}


def test_disk_full_fails_saves_reports_them_and_training_goes_on(tmp_path):
    plan = FaultPlan(seed=1)
    ck = _checkpointer(tmp_path / "run", plan)
    for s in range(3):
        ck.save(s, state_at(s)).result(30)
    plan.capacity_bytes = plan.written_bytes + 2000  # room for a part of one more checkpoint
    failed = [ck.save(s, state_at(s)) for s in range(3, 6)]  # training goes on: save returns each time
    for h in failed:
        with pytest.raises(OSError) as e:
            h.result(30)
        assert e.value.errno == errno.ENOSPC
    status = ck.status()
    assert status.failed == 3 and status.last_committed == 2
    assert any("No space" in m or "no space" in m for m in status.errors)
    plan.capacity_bytes = None  # space freed
    ck.save(6, state_at(6)).result(30)
    ck.close()
    assert plan.injected["enospc"] >= 3
    # The steps of the full disk are incomplete, invisible, and gc removes them.
    storage = ckpt.open_storage(str(tmp_path / "run"))
    assert ckpt.committed_steps(storage) == [0, 1, 2, 6]
    check_run(tmp_path / "run", expected_committed={0, 1, 2, 6})


def test_backend_down_is_reported_training_goes_on_and_earlier_checkpoints_stay(tmp_path):
    plan = FaultPlan(seed=2)
    ck = _checkpointer(tmp_path / "run", plan)
    ck.save(0, state_at(0)).result(30)
    plan.down = True
    down = [ck.save(s, state_at(s)) for s in (1, 2)]
    for h in down:
        with pytest.raises(ckpt.StorageError, match="failed after 3 attempts"):
            h.result(30)
    # Reading is refused with a clear error too, not a wrong answer.
    with pytest.raises(ckpt.StorageError, match="faulty://"):
        ckpt.load(empty_state(), faulty_url(tmp_path / "run"), storage_options={"faults": plan}, retry=RETRY)
    plan.down = False
    ck.save(3, state_at(3)).result(30)
    ck.close()
    assert ck.status().failed == 2
    check_run(tmp_path / "run", expected_committed={0, 3})


def test_on_error_raise_stops_the_loop_at_the_next_save(tmp_path):
    plan = FaultPlan(seed=4)
    ck = _checkpointer(tmp_path / "run", plan, on_error="raise")
    ck.save(0, state_at(0)).result(30)
    plan.down = True
    h = ck.save(1, state_at(1))
    with pytest.raises(ckpt.StorageError):
        h.result(30)
    with pytest.raises(ckpt.CkptError, match="checkpoint of step 1 failed"):
        ck.save(2, state_at(2))
    plan.down = False
    ck.close()
    check_run(tmp_path / "run", expected_committed={0})


def test_synchronous_save_under_a_permanent_failure_leaves_no_commit_point(tmp_path):
    plan = FaultPlan(seed=5)
    url = faulty_url(tmp_path / "run")
    ckpt.save(state_at(0), url, step=0, storage_options={"faults": plan}, retry=RETRY)
    plan.capacity_bytes = plan.written_bytes + 3000
    with pytest.raises(OSError) as e:
        ckpt.save(state_at(1), url, step=1, storage_options={"faults": plan}, retry=RETRY, max_chunk_bytes=1024)
    assert e.value.errno == errno.ENOSPC
    storage = ckpt.open_storage(str(tmp_path / "run"))
    assert [(s.step, s.committed) for s in ckpt.list_steps(storage)] == [(0, True), (1, False)]
    assert verify_step(storage, 0).ok
    out = empty_state()
    assert ckpt.load(out, str(tmp_path / "run")) == 0 and equal_state(out, state_at(0))


def test_random_fault_schedules(tmp_path):
    """The CI-sized version of `python -m tests.fault.fault_schedule` (figures in RELIABILITY.md)."""
    faults = 0
    for r in range(8):
        out = one_run(tmp_path / f"run{r}", seed=1000 + r, saves=25)
        faults += sum(out["faults"].values())
    assert faults > 200


@pytest.mark.slow
def test_random_fault_schedules_long(tmp_path):
    from .fault_schedule import main

    assert main(["--runs", "200", "--saves", "50", "--seed", "7"]) == 0
