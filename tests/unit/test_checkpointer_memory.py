"""The Checkpointer's host memory: the first checkpoint's plan and memory prepared off the
training thread, the automatic budget, and the preparation stopped when the Checkpointer closes."""

from __future__ import annotations

import threading

import torch

import ckpt
from tests.unit.test_checkpointer import make_job, train


def test_first_checkpoint_finds_its_plan_and_host_memory_ready(tmp_path):
    """restore() (or prepare()) builds the first checkpoint's plan and host memory in the
    background: the first save then allocates nothing and builds no plan on the training thread."""
    model, opt, sched, loader, state = make_job()
    with ckpt.Checkpointer(tmp_path, every_n_steps=1, keep_last=None, consolidate="never") as ck:
        ck.attach(opt)
        train(model, opt, sched, loader, [0])
        ck.prepare(state).result(60)
        plan, allocations = ck._plan, ck.status().host_allocations
        assert plan is not None and allocations == 2  # both slabs of the default budget, faulted in
        ck.save(1, state).result(60)
        assert ck._plan is plan and ck.status().host_allocations == allocations
    with ckpt.Checkpointer(tmp_path, every_n_steps=1, keep_last=None, consolidate="never") as ck2:
        model2, opt2, _sched2, _loader2, state2 = make_job()
        ck2.attach(opt2)
        assert ck2.restore(state2) == 2
        ck2._preparing.join(60)
        assert ck2._plan is not None and ck2.status().host_allocations == 2


class _Recorder:
    """A stateful object that notes the thread of each ``state_dict`` call."""

    def __init__(self) -> None:
        self.threads: list[str] = []
        self.n = torch.zeros(3)

    def state_dict(self) -> dict:
        self.threads.append(threading.current_thread().name)
        return {"n": self.n}

    def load_state_dict(self, sd: dict) -> None:
        self.n.copy_(sd["n"])


def test_the_preparation_calls_no_state_dict_off_the_training_thread(tmp_path):
    # A state_dict beside training races with it: DCP's optimizer helper steps a stateless
    # optimizer (SGD) on zero gradients and clears them while backward writes them (heap
    # corruption in a writer of the load harness, 1 run in 12). restore()'s preparation calls
    # every state_dict on the caller's thread; only the plan and the memory are built behind.
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = _Recorder()
    state = {"model": model, "optim": opt, "rec": rec}
    with ckpt.Checkpointer(tmp_path, every_n_steps=1, keep_last=None, consolidate="never") as ck:
        ck.save(0, state).result(60)
    rec.threads.clear()
    with ckpt.Checkpointer(tmp_path, every_n_steps=1, keep_last=None, consolidate="never") as ck2:
        ck2.attach(opt)
        assert ck2.restore(state) == 1
        ck2._preparing.join(60)
        assert ck2._plan is not None
        grads = [p.grad for p in model.parameters()]
    assert rec.threads and set(rec.threads) == {threading.current_thread().name}
    assert grads == [None, None]  # nobody stepped the optimizer behind training's back


def test_the_automatic_host_budget_grows_with_the_state(tmp_path):
    # A state that grows after the first save (a rank with nothing to write at first, new
    # entries): the automatic budget, twice the largest snapshot, follows instead of refusing.
    with ckpt.Checkpointer(str(tmp_path), every_n_steps=1, keep_last=None) as ck:
        ck.save(0, {"a": torch.zeros(4)})
        ck.wait()
        first = ck.pool.budget
        ck.save(1, {"a": torch.zeros(4), "b": torch.ones(256, 1024)})
        ck.wait()
        assert ck.pool.budget >= 2 * 256 * 1024 * 4 > first and ck.status().errors == ()
    out = {"a": torch.empty(4), "b": torch.empty(256, 1024)}
    assert ckpt.load(out, str(tmp_path)) == 1 and bool(out["b"].eq(1).all())


def test_a_snapshot_with_no_tensor_bytes_fits_the_automatic_budget():
    # A data-parallel rank whose arrays other replicas write stages nothing: its slab is empty.
    from ckpt.hostpool import HostBufferPool

    pool = HostBufferPool(max(2 * 0, 1))  # as the Checkpointer sizes it from a first snapshot of 0 bytes
    pool.follow(0)
    assert pool.acquire(0) is not None
    pool.follow(1 << 20)
    assert pool.budget >= 2 << 20 and pool.acquire(1 << 20) is not None


def test_small_tensors_lie_side_by_side_in_a_slab_and_a_page_or_more_starts_on_a_page():
    """Thousands of small tensors (norms, biases, a tiny model's weights) take a few pages of a
    slab, not a page each; a tensor of a page or more still starts on one (O_DIRECT)."""
    from ckpt.hostpool import ALIGN, DENSE, HostBufferPool, carved_bytes

    shapes = [((8, 8), torch.float32), ((3,), torch.float16), ((1024,), torch.float32), ((5,), torch.complex128),
              ((2, 2), torch.bfloat16), ((4096,), torch.uint8)]
    sizes = [torch.Size(s).numel() * d.itemsize for s, d in shapes]
    need = carved_bytes(sizes)
    slab = HostBufferPool(1 << 20).acquire(need)
    views = [slab.carve(s, d) for s, d in shapes]
    offsets = [slab.offset_of(v) for v in views]
    assert offsets == [0, 256, 4096, 8192, 8192 + 128, 3 * 4096] and slab.used == need == 4 * 4096
    assert all(o % (ALIGN if n >= ALIGN else DENSE) == 0 for o, n in zip(offsets, sizes))
    for v, (s, d) in zip(views, shapes):
        assert v.is_contiguous() and tuple(v.shape) == s and v.dtype == d
    for i, v in enumerate(views):  # disjoint: each keeps what was written to it
        v.view(torch.uint8).fill_(i + 1)
    assert [int(v.view(torch.uint8).min()) for v in views] == [int(v.view(torch.uint8).max()) for v in views] == \
        list(range(1, len(views) + 1))
    assert carved_bytes([256] * 2160) == 2160 * 256 == 135 * 4096  # a 2,160-array model of 8 x 8: 0.55 MB, not 8.8 MB


def test_prefault_stops_between_slabs_when_asked(tmp_path):
    """A Checkpointer closed while it prepares its first checkpoint stops allocating host memory
    nobody will use (a restore then close no longer waits for two slabs of pinned memory)."""
    from ckpt.capture import prefault

    state = {"w": torch.randn(1024), "b": torch.randn(16)}
    with ckpt.Checkpointer(str(tmp_path / "run"), pin_memory=False) as ck:
        plan, _, _ = ck._plan_for(ck._expander.expand(state))
        pool = ck._pool_for(plan.nbytes, plan.mine)
        asked = []
        prefault(pool, plan, stop=lambda: asked.append(1) or len(asked) > 1)
        assert len(asked) == 2
        assert pool.allocated_bytes >= plan.nbytes and pool.allocated_bytes < 2 * plan.nbytes
        prefault(pool, plan)  # not stopped: both slabs
        assert pool.allocated_bytes >= 2 * plan.nbytes


class GatedSlabs:
    """A saved run whose restore's preparation blocks in the allocator until ``gate`` is set
    (``inside``: it is there); ``made``: slabs asked for, by preparation thread."""

    def __init__(self, tmp_path, monkeypatch) -> None:
        import collections

        from ckpt.hostpool import PrivateAllocator

        self.state = {"w": torch.randn(4096), "b": torch.randn(16)}
        with ckpt.Checkpointer(str(tmp_path), pin_memory=False) as ck:
            ck.save(0, self.state, force=True)
        self.gate, self.inside = threading.Event(), threading.Event()
        self.made: collections.Counter = collections.Counter()
        real = PrivateAllocator.allocate

        def slow(allocator, nbytes, *, pin_memory):
            if threading.current_thread().name == "ckpt-prepare":
                self.made[threading.current_thread()] += 1
                self.inside.set()
                assert self.gate.wait(60)
            return real(allocator, nbytes, pin_memory=pin_memory)

        monkeypatch.setattr(PrivateAllocator, "allocate", slow)


def test_close_after_a_restore_does_not_wait_for_the_slab_being_made(tmp_path, monkeypatch):
    """A Checkpointer closed right after its restore returns without waiting for the slab its
    preparation is making (pinned or leased from an agent, mapped and registered: 2.7 s for
    3.5 GB on an H100 machine); the preparation frees its host memory as it ends."""
    run = GatedSlabs(tmp_path, monkeypatch)
    ck2 = ckpt.Checkpointer(str(tmp_path), pin_memory=False)
    assert ck2.restore(run.state) == 1
    assert ck2.save(1, run.state) is None  # the loop's next call: the preparation begins
    assert run.inside.wait(60)  # the preparation is making its first slab
    ck2.close()
    assert ck2._preparing._thread.is_alive()  # close returned while it was still at it
    run.gate.set()
    ck2._preparing.join(60)
    assert not ck2._preparing._thread.is_alive()
    assert ck2.pool.allocated_bytes == 0  # what it made is freed: the pool was cleared as it ended
    assert ck2.status().host_allocations == 1  # and it made no second slab once stopped


def test_a_second_restore_stops_the_first_ones_preparation(tmp_path, monkeypatch):
    """Restored twice (a retry, a second state): the first restore's preparation makes no more
    slabs once the second begins (it used to make its second slab as well)."""
    run = GatedSlabs(tmp_path, monkeypatch)
    ck2 = ckpt.Checkpointer(str(tmp_path), pin_memory=False)
    assert ck2.restore(run.state) == 1
    assert ck2.save(1, run.state) is None  # the loop's next call: the preparation begins
    assert run.inside.wait(60)  # the first preparation is making its first slab
    first = ck2._preparing
    assert ck2.restore(run.state) == 1
    assert ck2._preparing is not first
    ck2._preparing.go()
    run.gate.set()
    first.join(60)
    ck2._preparing.join(60)
    assert run.made[first._thread] == 1  # stopped after the slab it was making
    ck2.close()
    assert ck2.pool.allocated_bytes == 0


def test_a_restores_preparation_waits_for_the_loops_next_call(tmp_path):
    """After a restore whose next step takes no checkpoint, the first checkpoint's plan and
    memory are built from the loop's next call on (the node's other ranks, still restoring, keep
    the cores); a restore not followed by training builds nothing, and closes at once."""
    state = {"w": torch.randn(4096), "b": torch.randn(16)}
    with ckpt.Checkpointer(str(tmp_path), pin_memory=False, every_n_steps=5) as ck:
        ck.save(0, state)
    with ckpt.Checkpointer(str(tmp_path), pin_memory=False, every_n_steps=5) as ck:
        assert ck.restore(state) == 1
        ck._preparing.join(0.2)
        assert ck._preparing._thread.is_alive() and ck._plan is None and ck.pool is None  # waiting
        assert ck.save(1, state) is None
        ck._preparing.future.result(60)
        assert ck._plan is not None and ck.status().host_allocations == 2
        plan = ck._plan
        ck.save(5, state).result(60)
        assert ck._plan is plan and ck.status().host_allocations == 2  # the first checkpoint found both ready
    ck = ckpt.Checkpointer(str(tmp_path), pin_memory=False, every_n_steps=5)
    assert ck.restore(state) == 6
    ck.close()  # never told to go: stops without building anything
    ck._preparing.join(60)
    assert not ck._preparing._thread.is_alive() and ck._plan is None and ck.pool is None


def test_a_restore_whose_next_step_takes_a_checkpoint_prepares_at_once(tmp_path):
    state = {"w": torch.randn(4096)}
    with ckpt.Checkpointer(str(tmp_path), pin_memory=False, every_n_steps=5) as ck:
        ck.save(4, state, force=True)
    with ckpt.Checkpointer(str(tmp_path), pin_memory=False, every_n_steps=5) as ck:
        assert ck.restore(state) == 5
        ck._preparing.future.result(60)  # no call of the loop needed
        assert ck._plan is not None and ck.status().host_allocations == 2


def test_a_restores_preparation_gives_way_to_a_first_save_that_takes_a_checkpoint(tmp_path):
    """A loop that calls save only on checkpoint steps (as the framework integrations do): the
    deferred preparation never begins, and that save plans and allocates its own slab rather
    than wait for two; an attached optimizer's step is the loop's call too."""
    state = {"w": torch.randn(4096), "b": torch.randn(16)}
    with ckpt.Checkpointer(str(tmp_path), pin_memory=False, every_n_steps=100) as ck:
        ck.save(0, state, force=True)
    with ckpt.Checkpointer(str(tmp_path), pin_memory=False, every_n_steps=100) as ck:
        assert ck.restore(state) == 1
        preparing = ck._preparing
        ck.save(7, state, force=True).result(60)
        preparing.join(60)
        assert not preparing._thread.is_alive() and preparing.future.result(0) is None
        assert ck.status().host_allocations == 1  # the save's own slab only
    w = torch.nn.Parameter(torch.randn(64))
    opt = torch.optim.SGD([w], lr=0.1)
    with ckpt.Checkpointer(str(tmp_path / "opt"), pin_memory=False, every_n_steps=100) as ck:
        ck.save(0, {"w": w}, force=True)
    with ckpt.Checkpointer(str(tmp_path / "opt"), pin_memory=False, every_n_steps=100) as ck:
        ck.attach(opt)
        assert ck.restore({"w": w}) == 1
        w.grad = torch.ones(64)
        opt.step()  # the loop's first step begins the preparation
        ck._preparing.future.result(60)
        assert ck._plan is not None and ck.status().host_allocations == 2
