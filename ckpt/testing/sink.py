"""The sink conformance suite: what every ``ckpt.Sink`` must do with the jobs it is given.

```python
from ckpt.testing.sink import SinkTests

class TestMySink(SinkTests):
    def make(self, storage, tmp_path, writer):
        return MySink(storage, ...)          # persists as ``writer``; closed by the suite
```

A job comes from the sink's own host pool (``Sink.host_pool``), as the engine does it.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from ..commit import save_id
from ..errors import CheckpointExistsError
from ..format import committed_steps, read_manifest, writer_name
from ..io import load_step
from ..plan import SavePlan, plan_save
from ..restore import RestoreSource, Tier
from ..sink import PersistJob, Sink
from ..storage import LocalStorage, Storage


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(300, 70, generator=g), "b": torch.arange(1000, dtype=torch.int64),
            "h": torch.randn(64, generator=g).to(torch.bfloat16), "note": f"seed {seed}"}


class SinkTests:
    """Subclass and implement :meth:`make`."""

    def make(self, storage: Storage, tmp_path: Any, writer: str = writer_name(0)) -> Sink:
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------------

    def job(self, sink: Sink, step: int, state: dict[str, Any], *, writer: str = writer_name(0),
            writers: tuple[str, ...] = (writer_name(0),), committer: bool = True,
            rank: int = 0) -> tuple[PersistJob, list[int]]:
        """A job staged the way the engine stages it: a slab of the sink's pool, the plan's
        tensors copied into views of it. Returns the job and a list that counts releases."""
        plan = plan_save(state, rank=rank, world=len(writers), max_chunk_bytes=64 << 10)
        nbytes = sum(r.tensor.numel() * r.tensor.element_size() for r in plan.requests) + 4096 * len(plan.requests)
        pool = sink.host_pool(max(nbytes * 2, 1 << 20), pin_memory=False)
        slab = pool.acquire(max(nbytes, 1))
        views = {}
        requests = []
        for r in plan.requests:
            if id(r.tensor) not in views:
                v = slab.carve(r.tensor.shape, r.tensor.dtype)
                v.copy_(r.tensor)
                views[id(r.tensor)] = v
            requests.append(type(r)(r.path, r.index, views[id(r.tensor)], r.slices, r.chunk_shape, r.separator))
        released: list[int] = []

        def release() -> None:
            released.append(1)
            pool.release(slab)

        job = PersistJob(step=step, save_id=save_id("conformance", step), writer=writer, writers=writers,
                         plan=SavePlan(plan.arrays, requests, plan.metadata, plan.values), committer=committer,
                         release=release, slab=slab)
        return job, released

    def storage(self, tmp_path: Any) -> Storage:
        return LocalStorage(str(tmp_path / "run"))

    # -- the contract --------------------------------------------------------------------------

    def test_a_job_is_persisted_committed_and_released_once(self, tmp_path):
        storage = self.storage(tmp_path)
        sink = self.make(storage, tmp_path)
        try:
            state = _state(1)
            job, released = self.job(sink, 3, state)
            sink.submit(job)
            frag = job.persisted.result(timeout=120)
            manifest = job.committed.result(timeout=120)
            assert frag.step == 3 and frag.save_id == job.save_id
            assert manifest.step == 3 and manifest.save_id == job.save_id
        finally:
            sink.close()
        assert released == [1]
        assert committed_steps(storage) == [3]
        out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else "" for k, v in state.items()}
        load_step(storage, out, 3)
        assert all(torch.equal(out[k], v) if isinstance(v, torch.Tensor) else out[k] == v for k, v in state.items())

    def test_jobs_finish_in_any_number_and_close_waits_for_them(self, tmp_path):
        storage = self.storage(tmp_path)
        sink = self.make(storage, tmp_path)
        jobs = []
        try:
            for step in (1, 2, 3):
                job, _ = self.job(sink, step, _state(step))
                sink.submit(job)
                jobs.append(job)
        finally:
            sink.close(wait=True)
        assert all(j.committed.done() and j.committed.exception() is None for j in jobs)
        assert committed_steps(storage)[-3:] == [1, 2, 3] or committed_steps(storage) == [1, 2, 3]

    def test_a_committed_step_is_never_overwritten(self, tmp_path):
        storage = self.storage(tmp_path)
        sink = self.make(storage, tmp_path)
        try:
            first, _ = self.job(sink, 5, _state(5))
            sink.submit(first)
            first.committed.result(timeout=120)
            again, released = self.job(sink, 5, _state(6))
            again.save_id = save_id("another", 5)
            sink.submit(again)
            with pytest.raises(CheckpointExistsError):
                again.persisted.result(timeout=120)
            with pytest.raises(CheckpointExistsError):
                again.committed.result(timeout=120)
        finally:
            sink.close()
        assert released == [1]
        assert read_manifest(storage, 5).save_id == first.save_id

    def test_a_writer_that_is_not_the_committer_learns_of_the_commit(self, tmp_path):
        """Two writers of one save: the committer's sink commits once both fragments are in;
        the other's ``committed`` future resolves when the commit point appears."""
        storage = self.storage(tmp_path)
        writers = (writer_name(0), writer_name(1))
        a, b = self.make(storage, tmp_path / "a", writers[0]), self.make(storage, tmp_path / "b", writers[1])
        try:
            s0, s1 = _state(7), _state(7)
            j0, _ = self.job(a, 9, s0, writer=writers[0], writers=writers, committer=True, rank=0)
            j1, _ = self.job(b, 9, s1, writer=writers[1], writers=writers, committer=False, rank=1)
            b.submit(j1)
            a.submit(j0)
            m0, m1 = j0.committed.result(timeout=120), j1.committed.result(timeout=120)
        finally:
            a.close()
            b.close()
        assert m0.save_id == m1.save_id == j0.save_id and m0.writers == writers

    def test_after_commit_runs_on_the_committer(self, tmp_path):
        storage = self.storage(tmp_path)
        sink = self.make(storage, tmp_path)
        seen: list[int] = []
        done = threading.Event()
        if getattr(sink, "after_commit", None) is None and not self.runs_after_commit:
            sink.close()
            pytest.skip("this sink runs retention itself")
        sink.after_commit = lambda m: (seen.append(m.step), done.set())
        try:
            job, _ = self.job(sink, 11, _state(11))
            sink.submit(job)
            job.committed.result(timeout=120)
            assert done.wait(60)
        finally:
            sink.close()
        assert seen == [11]

    runs_after_commit = True  # False for a sink that runs retention elsewhere (a node agent)

    def test_restore_source_reads_what_was_committed(self, tmp_path):
        storage = self.storage(tmp_path)
        sink = self.make(storage, tmp_path)
        state = _state(13)
        try:
            job, _ = self.job(sink, 13, state)
            sink.submit(job)
            job.committed.result(timeout=120)
            source = sink.restore_source(storage)
            assert isinstance(source, RestoreSource)
            out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else "" for k, v in state.items()}
            load_step(source, out, 13)
            served = source.served()
        finally:
            sink.close()
        assert all(torch.equal(out[k], v) if isinstance(v, torch.Tensor) else out[k] == v for k, v in state.items())
        assert Tier.STORAGE in served and sum(served.values()) > 0
