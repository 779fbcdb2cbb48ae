"""The shipped conformance suites (``ckpt.testing``) run against every implementation in the
tree: sinks (in-process, node agent) and restore sources (storage, agent memory). The storage
suite runs in test_storage.py."""

from __future__ import annotations

import pytest

import ckpt
from ckpt.format import writer_name
from ckpt.sink import InProcessSink, SinkConfig
from ckpt.testing.restore_source import RestoreSourceTests
from ckpt.testing.sink import SinkTests
from tests.helpers import local_agent


class TestInProcessSink(SinkTests):
    def make(self, storage, tmp_path, writer=writer_name(0)):
        return InProcessSink(storage, SinkConfig(io_threads=4, poll_interval_s=0.01, commit_timeout_s=20))


class _ClosingAgentSink:
    """An agent sink whose close also stops the agent the suite started for it."""

    def __init__(self, sink, stack):
        self._sink, self._stack = sink, stack

    def __getattr__(self, name):
        return getattr(self._sink, name)

    def __setattr__(self, name, value):
        if name in ("_sink", "_stack"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._sink, name, value)

    def close(self, *, wait=True):
        try:
            self._sink.close(wait=wait)
        finally:
            self._stack.close()


class TestAgentSink(SinkTests):
    runs_after_commit = True

    def make(self, storage, tmp_path, writer=writer_name(0)):
        import contextlib

        from agent.trainer.sink import AgentSink

        tmp_path.mkdir(parents=True, exist_ok=True)
        stack = contextlib.ExitStack()
        stack.enter_context(local_agent(tmp_path, "conform", memory_budget_bytes=64 << 20))
        sink = AgentSink(f"unix://{tmp_path / 'a.sock'}", storage=storage, writer=writer,
                         config=SinkConfig(io_threads=4, library_versions=ckpt.version.library_versions()),
                         after_commit=None)
        return _ClosingAgentSink(sink, stack)


class TestStorageSource(RestoreSourceTests):
    def make(self, storage, step, tmp_path):
        return ckpt.StorageSource(storage)


class TestAgentMemoryTier(RestoreSourceTests):
    """The agent's memory tier serving a snapshot it holds (saved through the agent)."""

    def run(self, tmp_path):
        import contextlib

        from ckpt.testing.restore_source import STEP, state

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(local_agent(tmp_path, "conformtier", memory_budget_bytes=64 << 20))
        self._addr = f"unix://{tmp_path / 'a.sock'}"
        with ckpt.Checkpointer(str(tmp_path / "run"), agent=self._addr, max_chunk_bytes=16 << 10, keep_last=None) as c:
            c.save(STEP, state(), force=True).result(60)
        return ckpt.open_storage(str(tmp_path / "run"))

    def make(self, storage, step, tmp_path):
        self._ck = ckpt.Checkpointer(storage, agent=self._addr)
        source = self._ck.sink.restore_source(storage)
        assert source.tier is ckpt.Tier.AGENT_MEMORY and source.steps_in_memory == [step]
        return source

    def teardown_method(self):
        ck = getattr(self, "_ck", None)
        if ck is not None:
            ck.close()
        stack = getattr(self, "_stack", None)
        if stack is not None:
            stack.close()


class TestAgentStepTableTier(TestAgentMemoryTier):
    """The agent's table of a step it holds whole (every array in one chunk): what the table does
    not serve, the full tier behind it does, listed on first use."""

    def run(self, tmp_path):
        import contextlib

        from ckpt.testing.restore_source import STEP, state

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(local_agent(tmp_path, "conformtable", memory_budget_bytes=64 << 20))
        self._addr = f"unix://{tmp_path / 'a.sock'}"
        with ckpt.Checkpointer(str(tmp_path / "run"), agent=self._addr, keep_last=None) as c:
            c.save(STEP, state(), force=True).result(60)
        return ckpt.open_storage(str(tmp_path / "run"))

    def make(self, storage, step, tmp_path):
        from agent.trainer.table import TableSource

        self._ck = ckpt.Checkpointer(storage, agent=self._addr)
        source = self._ck.sink.restore_source(storage, step=step)
        assert isinstance(source, TableSource) and source.held_step(step) is not None
        return source


class TestAgentMemoryTierHoldingNothing(RestoreSourceTests):
    """The agent's memory tier of an agent that holds nothing of the run: every read goes to
    storage, charged to a 'not held' fallback."""

    def make(self, storage, step, tmp_path):
        from agent.trainer.memory import AgentMemoryStorage

        return AgentMemoryStorage(ckpt.StorageSource(storage), [], str(tmp_path))


def test_the_memory_tier_serves_its_own_chunks_and_storage_nothing(tmp_path):
    t = TestAgentMemoryTier()
    try:
        storage = t.run(tmp_path)
        source = t.make(storage, 4, tmp_path)
        from ckpt.io import load_step
        from ckpt.testing.restore_source import state

        out = {k: v.clone().zero_() if hasattr(v, "zero_") else "" for k, v in state().items()}
        load_step(source, out, 4)
        served = source.served()
        assert served[ckpt.Tier.AGENT_MEMORY] > 0 and served[ckpt.Tier.STORAGE] == 0
    finally:
        t.teardown_method()


@pytest.fixture(autouse=True)
def _no_leftover_threads():
    yield
