"""The hook API: bit-exact resume, snapshots as of save, the host budget, storage failures."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

import ckpt
from ckpt.storage import LocalStorage, Storage
from tests.helpers import DelegatingStorage, bits_equal


class StatefulLoader:
    """A shuffling data loader that knows its position (like torchdata's StatefulDataLoader)."""

    def __init__(self, n: int = 64, batch: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.batch, self.seed, self.epoch, self.pos = batch, seed, 0, 0
        self.seen: list[list[int]] = []

    def next(self):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        idx = order[self.pos : self.pos + self.batch]
        self.seen.append(idx.tolist())
        self.pos += self.batch
        if self.pos >= len(self.x):
            self.epoch, self.pos = self.epoch + 1, 0
        return self.x[idx], self.y[idx]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, s):
        self.epoch, self.pos, self.seed = s["epoch"], s["pos"], s["seed"]


def make_job(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    loader = StatefulLoader()
    state = {"model": model, "optim": opt, "sched": sched, "loader": loader, "rng": ckpt.RNGState()}
    return model, opt, sched, loader, state


def train(model, opt, sched, loader, steps, ckptr=None, state=None, force_last=False):
    for step in steps:
        x, y = loader.next()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if ckptr is not None:
            ckptr.save(step, state, force=force_last and step == steps[-1])


def test_resume_is_bit_exact(tmp_path):
    # Uninterrupted: 60 steps.
    m1, o1, s1, l1, _ = make_job()
    train(m1, o1, s1, l1, list(range(60)))

    # Interrupted: 30 steps with checkpoints, then a new process-like job restores and does 30 more.
    m2, o2, s2, l2, st2 = make_job()
    with ckpt.Checkpointer(tmp_path, every_n_steps=10, keep_last=2) as ck:
        assert ck.restore(st2) is None
        ck.attach(o2)
        train(m2, o2, s2, l2, list(range(30)), ck, st2, force_last=True)
    m3, o3, s3, l3, st3 = make_job(seed=99)  # different init: everything must come from the checkpoint
    with ckpt.Checkpointer(tmp_path, every_n_steps=10, keep_last=2) as ck:
        start = ck.restore(st3)
        assert start == 30
        ck.attach(o3)
        train(m3, o3, s3, l3, list(range(start, 60)), ck, st3)

    for (n, a), (_, b) in zip(m1.state_dict().items(), m3.state_dict().items()):
        assert bits_equal(a, b), n
    for p1, p3 in zip(m1.parameters(), m3.parameters()):
        for k, v in o1.state[p1].items():
            assert bits_equal(v, o3.state[p3][k]), k
    assert s1.state_dict() == s3.state_dict()
    assert l1.seen[30:] == l3.seen  # the same batches, in the same order
    # Retention kept the newest two (20 and 29), plus the resumed run's 30..50.
    assert ckpt.committed_steps(ckpt.open_storage(tmp_path)) == [40, 50]


def test_snapshot_equals_state_at_save_although_training_goes_on(tmp_path):
    model, opt, sched, loader, state = make_job()
    train(model, opt, sched, loader, range(3))
    slow = SlowStorage(LocalStorage(str(tmp_path)), delay_s=0.02)
    with ckpt.Checkpointer(slow, every_n_steps=1, keep_last=None) as ck:
        ck.attach(opt)
        train(model, opt, sched, loader, [3])
        expected = copy.deepcopy(model.state_dict())  # includes BatchNorm running stats
        expected_m = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
        handle = ck.save(100, state)
        train(model, opt, sched, loader, range(4, 8))  # changes params, optimizer state and buffers
        manifest = handle.result(timeout=60)
        assert handle.state is ckpt.SnapshotState.COMMITTED
    assert manifest.step == 100
    m2, o2, s2, l2, st2 = make_job(seed=5)
    with ckpt.Checkpointer(tmp_path) as ck:
        assert ck.restore(st2, step=100) == 101
    for k, v in expected.items():
        assert bits_equal(m2.state_dict()[k], v), k
    for k, v in expected_m.items():
        assert bits_equal(o2.state[next(m2.parameters())][k], v), k


def test_only_checkpoint_steps_snapshot_and_status(tmp_path):
    model, opt, sched, loader, state = make_job()
    with ckpt.Checkpointer(tmp_path, every_n_steps=5, keep_last=None) as ck:
        ck.attach(opt)
        handles = [ck.save(s, state) for s in range(12)]
        assert [h is not None for h in handles] == [s % 5 == 0 for s in range(12)]
        ck.wait()
        st = ck.status()
    assert [c["step"] for c in st.checkpoints] == [0, 5, 10]
    assert all(c["state"] == "committed" for c in st.checkpoints)
    assert st.last_committed == 10 and st.failed == 0 and st.errors == ()
    assert ckpt.committed_steps(ckpt.open_storage(tmp_path)) == [0, 5, 10]


def test_host_budget_is_never_exceeded_and_busy_policy_skips(tmp_path, caplog):
    model, opt, sched, loader, state = make_job()
    train(model, opt, sched, loader, range(1))
    slow = SlowStorage(LocalStorage(str(tmp_path)), delay_s=0.05)
    with ckpt.Checkpointer(slow, every_n_steps=1, keep_last=None, when_busy="skip") as ck:
        ck.attach(opt)
        first = ck.save(0, state)
        ck.pool.budget = first.nbytes + 64  # room for exactly one snapshot in flight (testing only)
        budget = ck.pool.budget
        results = []
        for s in range(1, 6):
            train(model, opt, sched, loader, [s])
            results.append(ck.save(s, state))
            assert ck.pool.allocated_bytes <= budget
        ck.wait()
        status = ck.status()
    assert status.skipped >= 1 and any(r.skipped for r in results)
    assert status.host_peak_bytes <= budget
    assert "skipped" in caplog.text
    # With "block", every checkpoint is taken and slabs are reused: allocated once.
    with ckpt.Checkpointer(tmp_path / "b", every_n_steps=1, keep_last=None, when_busy="block") as ck:
        ck.attach(opt)
        for s in range(4):
            train(model, opt, sched, loader, [s])
            ck.save(s, state)
        ck.wait()
        status = ck.status()
    assert status.skipped == 0 and status.host_allocations <= 2
    assert status.host_peak_bytes <= status.host_budget_bytes


def test_failing_storage_is_reported_and_training_goes_on(tmp_path, caplog):
    model, opt, sched, loader, state = make_job()
    broken = BrokenStorage(LocalStorage(str(tmp_path)))
    ck = ckpt.Checkpointer(broken, every_n_steps=1, keep_last=None, commit_timeout_s=5)
    ck.attach(opt)
    for s in range(3):
        train(model, opt, sched, loader, [s])
        h = ck.save(s, state)  # never raises with on_error="warn"
    with pytest.raises(PermissionError):
        h.result(timeout=30)
    ck.wait()
    st = ck.status()
    assert st.failed == 3 and st.last_committed is None
    assert any("PermissionError" in e for e in st.errors)
    assert "checkpoint of step" in caplog.text
    ck.close()
    assert ckpt.committed_steps(ckpt.open_storage(tmp_path)) == []
    # on_error="raise": the failure surfaces at the next save (or wait/close).
    ck = ckpt.Checkpointer(broken, every_n_steps=1, keep_last=None, on_error="raise")
    ck.attach(opt)
    ck.save(0, state)
    with pytest.raises(ckpt.CkptError, match="PermissionError"):
        ck.wait()
    ck.close()


def test_config_is_validated():
    with pytest.raises(ValueError, match="every_n_steps"):
        ckpt.Checkpointer("/tmp/x", every_n_steps=0)
    with pytest.raises(ValueError, match="when_busy"):
        ckpt.CheckpointerConfig(url="/tmp/x", when_busy="maybe")
    with pytest.raises(TypeError):
        ckpt.Checkpointer("/tmp/x", no_such_option=1)


class SlowStorage(DelegatingStorage):
    def __init__(self, inner: Storage, delay_s: float):
        super().__init__(inner)
        self.delay_s = delay_s

    def write(self, path, parts, *, durable=True):
        time.sleep(self.delay_s)
        self.inner.write(path, parts, durable=durable)


class BrokenStorage(DelegatingStorage):
    """Chunk writes fail for good (a permission problem); everything else works."""

    def write(self, path, parts, *, durable=True):
        if "/c/" in path or "/c." in path or path.endswith("/c") or "/.packs/" in path:
            raise PermissionError(f"denied: {path}")
        self.inner.write(path, parts, durable=durable)


def test_cached_expander_gives_the_helpers_state_dicts_and_notices_changes():
    from ckpt.stateful import CachedExpander, _same_tree, expand

    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"model": model, "optim": opt, "step": 1}
    ex = CachedExpander()
    assert _same_tree(ex.expand(state).tree, expand(state).tree)  # before the first step: no optimizer state
    model(torch.randn(4, 6)).sum().backward()
    opt.step()  # creates the AdamW state: the walk must notice and go back to the helpers
    for _ in range(2):
        assert _same_tree(ex.expand(state).tree, expand(state).tree)
    opt.param_groups[0]["lr"] = 0.5  # hyperparameters are read anew every time
    assert ex.expand(state).tree["optim"]["param_groups"][0]["lr"] == 0.5
    only = {"model": model}
    ex.expand(only)
    model[0].weight = nn.Parameter(torch.ones(8, 6))  # a replaced parameter is seen
    assert bits_equal(ex.expand(only).tree["model"]["0.weight"], torch.ones(8, 6))
    model.add_module("extra", nn.Linear(3, 2))  # a new submodule: back to the helpers
    tree = ex.expand(only).tree
    assert _same_tree(tree, expand(only).tree) and "extra.weight" in tree["model"]


def test_repeated_saves_reuse_the_plan_and_take_new_values_and_tensors(tmp_path):
    model = nn.Linear(6, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    extra = {"t": torch.arange(4.0)}
    state = {"model": model, "optim": opt, "extra": extra, "note": "a"}
    with ckpt.Checkpointer(tmp_path, every_n_steps=1, keep_last=None) as c:
        c.attach(opt)
        c.save(0, state).result()
        plan = c._plan
        state["note"] = "b"
        with torch.no_grad():
            model.weight.add_(1.0)
        c.save(1, state).result()
        assert c._plan is plan  # same tensors: the plan was reused
        extra["t"] = torch.arange(6.0)  # another shape: planned anew
        c.save(2, state).result()
        assert c._plan is not plan
    for step, note, n in ((0, "a", 4), (1, "b", 4), (2, "b", 6)):
        out = {"extra": {"t": torch.zeros(n)}, "note": None}
        ckpt.load(out, tmp_path, step=step, strict=False)
        assert out["note"] == note and bits_equal(out["extra"]["t"], torch.arange(float(n)))
    m = nn.Linear(6, 4)
    with ckpt.Checkpointer(tmp_path) as c:
        c.restore({"model": m}, step=1, strict=False)
    assert bits_equal(m.weight, model.weight)


def test_external_committer(tmp_path):
    """commit_by="external": the ranks persist, someone else (a coordinator) commits."""
    import threading

    from ckpt import format as fmt
    from ckpt.commit import wait_for_fragments

    model = nn.Linear(4, 2)
    with ckpt.Checkpointer(tmp_path, every_n_steps=1, commit_by="external", commit_timeout_s=30) as c:
        h = c.save(3, {"model": model})
        h.persisted.result(timeout=30)
        assert not h.committed.done() and fmt.committed_steps(c.storage) == []

        def coordinator():
            wait_for_fragments(c.storage, 3, f"{c.run_id}-3", c.writers, timeout_s=30, poll_s=0.01)
            ckpt.commit(c.storage, 3, c.writers, save_id=f"{c.run_id}-3")

        t = threading.Thread(target=coordinator)
        t.start()
        assert h.result(timeout=30).step == 3
        t.join()
    with pytest.raises(ValueError, match="commit_by"):
        ckpt.Checkpointer(tmp_path, commit_by="nobody")


@pytest.mark.parametrize("cls, kw", [(torch.optim.AdamW, {}), (torch.optim.Adam, {"amsgrad": True}),
                                     (torch.optim.Adam, {"foreach": False, "weight_decay": 0.1})])
def test_fresh_adam_state_is_prefilled_like_the_helpers_zero_step(cls, kw):
    """A fresh Adam/AdamW gets the state a first step creates without running one: the same
    entries, shapes, dtypes and devices as torch.distributed.checkpoint's zero-gradient step
    (whose `step` is 1, ours 0: the load overwrites both; ours are all zeros), and the
    parameters untouched."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state, get_optimizer_state_dict

    from ckpt.stateful import OptimizerState

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
        model[0].bias.requires_grad_(False)
        return model, cls(model.parameters(), lr=0.1, **kw)

    m1, o1 = make()
    before = {k: v.clone() for k, v in m1.state_dict().items()}
    ours = OptimizerState(m1, o1).state_dict()
    m2, o2 = make()
    _init_optim_state(o2)
    theirs = get_optimizer_state_dict(m2, o2)
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys() and "0.bias" not in ours["state"]
    for name, entries in theirs["state"].items():
        assert ours["state"][name].keys() == entries.keys()
        for key, t in entries.items():
            o = ours["state"][name][key]
            assert (o.shape, o.dtype, o.device) == (t.shape, t.dtype, t.device), (name, key)
            if key != "step" and not kw.get("weight_decay"):
                # (Adam's coupled weight decay makes the zero step's moments wd * p, not 0)
                assert torch.equal(o, t)
    assert all(torch.equal(v, before[k]) for k, v in m1.state_dict().items())
    assert all(p.grad is None for p in m1.parameters())


def test_optimizers_we_do_not_know_keep_the_helpers_init():
    from ckpt.stateful import _prefill_adam_state

    class MyAdam(torch.optim.Adam):
        pass

    model = torch.nn.Linear(3, 3)
    for opt in (MyAdam(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)):
        _prefill_adam_state(opt)
        assert not opt.state
