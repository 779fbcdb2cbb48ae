"""Policy heal and auto for data-parallel jobs, without processes: which survivor's live state
the job continues from, when it reloads instead and why, and how a worker process knows whether
its live state is whole."""

from __future__ import annotations

import pytest
import torch

from recovery.config import RunConfig
from recovery.detect import AGENT_DIED, HANG, NODE_DIED, STRAGGLER, WORKER_DIED, WORKER_ERROR, Failure
from recovery.heal import AutoHealPolicy, HealPolicy, decide_before_stop, decide_heal
from recovery.live import HealSpec, Interrupted, LiveSlot, LiveState, adopt, receivers_of
from recovery.policies import resolve_policy
from recovery.policy import HEAL, RELOAD, RESTARTED, JobKind
from recovery.testing import FakeDataParallelJob


def _failure(kind=WORKER_DIED, ranks=(1,), culprits=(), last_step=44):
    return Failure(kind, 0, "injected", 1000.0, ranks=ranks, culprits=culprits, last_step=last_step)


def _live(**steps):
    """rank -> LiveState from keywords r0=(step, clean)."""
    return {int(k[1:]): LiveState(int(k[1:]), s, c, "test") for k, (s, c) in steps.items()}


def test_heal_continues_from_the_survivors_step_sent_by_the_lowest_rank():
    d = decide_heal(_live(r0=(44, True), r2=(44, True), r3=(44, True)), world_size=4)
    assert (d.policy, d.source, d.step, d.current) == (HEAL, 0, 44, (0, 2, 3))
    assert "continues at step 45" in d.reason and "1 replacement" in d.reason


def test_survivors_one_step_apart_agree_on_the_newer_step():
    # rank 2 applied step 45 (its all-reduce completed before the peer died); ranks 0 and 3 did not
    d = decide_heal(_live(r0=(44, True), r2=(45, True), r3=(44, True)), world_size=4)
    assert (d.policy, d.source, d.step, d.current) == (HEAL, 2, 45, (2,))
    assert "rank(s) [0, 3] at step 44 take step 45" in d.reason
    # every other rank receives rank 2's state: nobody keeps a state of its own at step 44
    assert receivers_of(4, d.current) == (0, 1, 3)


def test_survivors_more_than_one_step_apart_reload_and_say_why():
    d = decide_heal(_live(r0=(40, True), r2=(44, True)), world_size=3)
    assert d.policy == RELOAD and "more than one step apart" in d.reason and "{0: 40, 2: 44}" in d.reason


def test_a_survivor_stopped_mid_step_is_never_the_source():
    d = decide_heal(_live(r0=(45, False), r1=(44, True)), world_size=3)
    assert (d.policy, d.source, d.step, d.current) == (HEAL, 1, 44, (1,))
    assert "rank(s) [0] stopped mid-step" in d.reason
    d = decide_heal(_live(r0=(45, False), r1=(44, False)), world_size=3)
    assert d.policy == RELOAD and "no survivor stopped between two steps" in d.reason


def test_no_survivor_or_no_live_state_reloads():
    assert decide_heal({}, world_size=2).policy == RELOAD
    d = decide_heal(_live(r0=(None, True), r1=(44, True)), world_size=3)
    assert d.policy == RELOAD and "ctx.resume" in d.reason


@pytest.mark.parametrize("failure, auto, expected", [
    (_failure(WORKER_DIED, ranks=(1,)), True, None),
    (_failure(NODE_DIED, ranks=(0, 1)), True, "every rank was lost"),
    (_failure(NODE_DIED, ranks=(1,)), True, None),
    (_failure(AGENT_DIED, ranks=()), True, None),
    (_failure(STRAGGLER, ranks=(1,)), True, None),
    (_failure(HANG, ranks=(0, 1), culprits=(1,)), True, None),
    (_failure(HANG, ranks=(0, 1), culprits=()), True, "no culprit"),
    (_failure(HANG, ranks=(0, 1), culprits=()), False, None),  # heal asked: it looks at the survivors
    (_failure(WORKER_ERROR, ranks=(0,)), True, "train_fn raised"),
    (_failure(WORKER_ERROR, ranks=(0,)), False, None),
])
def test_what_auto_decides_before_stopping(failure, auto, expected):
    d = decide_before_stop(failure, world_size=2, auto=auto)
    if expected is None:
        assert d is None
    else:
        assert d.policy == RELOAD and expected in d.reason


def _job(**kw):
    return FakeDataParallelJob(RunConfig(num_workers=4, storage="memory://heal", min_workers=2), **kw)


def test_heal_policy_heals_and_logs_the_choice_and_reason():
    job = _job()
    out = HealPolicy().on_failure(_failure(ranks=(3,)), job)
    assert (out.action, out.policy, out.live_step, out.world_size, out.restore) == (RESTARTED, HEAL, 44, 4, None)
    assert ("heal", 4, 0, 44) in job.calls and ("find",) not in job.calls
    (plan,) = job.events.of_kind("restore_plan")
    assert plan.fields["chosen"] == HEAL and plan.fields["policy"] == "heal" and plan.fields["step"] == 44


def test_a_heal_whose_replacement_did_not_start_is_recorded_as_the_reload_it_became():
    # The job's start fell back to the newest checkpoint (a worker did not start: the live
    # state it was to receive went with it): the outcome says reload, from that checkpoint.
    from recovery.restore import RestorePoint

    class NoStart(FakeDataParallelJob):
        def heal_workers(self, source, step, current):
            world = super().heal_workers(source, step, current)
            self.heal_fallback = RestorePoint(40)
            return world

    job = NoStart(RunConfig(num_workers=4, storage="memory://heal", min_workers=2))
    out = HealPolicy().on_failure(_failure(ranks=(3,)), job)
    assert (out.action, out.policy, out.live_step, out.restore.step) == (RESTARTED, RELOAD, None, 40)
    assert "did not start" in out.detail


def test_heal_grows_back_in_place_where_the_placement_kept_the_bundles_and_reloads_elsewhere():
    cfg = RunConfig(num_workers=4, storage="memory://heal", min_workers=2, allow_grow=True)
    job = FakeDataParallelJob(cfg, world=3)
    job.grow_in_place = True
    out = HealPolicy().on_checkpoint(50, job)
    assert (out.action, out.policy, out.live_step, out.world_size, out.restore) == (RESTARTED, HEAL, 44, 4, None)
    assert job.calls == [("stop", "room for 4 workers again (grow back from 3 after step 50)"), ("start", 4, None),
                         ("heal", 4, 0, 44)]  # every survivor kept, no checkpoint read
    (plan,) = job.events.of_kind("restore_plan")
    assert plan.fields["grow"] and plan.fields["chosen"] == HEAL and "1 replacement(s)" in plan.fields["reason"]
    assert HealPolicy().on_checkpoint(60, job) is None  # whole again
    moved = FakeDataParallelJob(cfg, world=3)  # its placement group is new and smaller: from the checkpoint
    out = HealPolicy().on_checkpoint(50, moved)
    assert (out.action, out.world_size, out.restore.step) == (RESTARTED, 4, 40) and ("find",) in moved.calls
    full = FakeDataParallelJob(RunConfig(num_workers=4, storage="memory://heal", min_workers=2), world=3)
    full.grow_in_place = True
    assert HealPolicy().on_checkpoint(50, full) is None  # allow_grow is off


def test_inconsistent_live_state_falls_back_to_reload_with_the_reason_in_the_event():
    class Apart(FakeDataParallelJob):
        def stop_keeping_state(self, reason):
            super().stop_keeping_state(reason)
            return _live(r0=(30, True), r1=(44, True), r2=(44, True))

    job = Apart(RunConfig(num_workers=4, storage="memory://heal", min_workers=2))
    out = AutoHealPolicy().on_failure(_failure(ranks=(3,)), job)
    assert (out.action, out.policy, out.live_step) == (RESTARTED, RELOAD, None)
    assert out.restore is job.point and ("find",) in job.calls
    (plan,) = job.events.of_kind("restore_plan")
    assert plan.fields["chosen"] == RELOAD and "more than one step apart" in plan.fields["reason"]


def test_auto_reloads_when_train_fn_raised_without_stopping_to_look():
    job = _job()
    out = AutoHealPolicy().on_failure(_failure(WORKER_ERROR, ranks=(0,)), job)
    assert out.policy == RELOAD and not [c for c in job.calls if c[0] == "heal"]
    assert "train_fn raised" in job.events.of_kind("restore_plan")[0].fields["reason"]


def test_auto_means_heal_or_reload_for_recovery_run_and_stays_the_pipelines_elsewhere():
    from recovery.checkfree import AutoPolicy

    assert isinstance(resolve_policy("auto", JobKind.DATA_PARALLEL), AutoHealPolicy)
    assert isinstance(resolve_policy("auto"), AutoPolicy) and isinstance(resolve_policy("auto", JobKind.PIPELINE),
                                                                         AutoPolicy)
    assert isinstance(resolve_policy("heal"), HealPolicy) and resolve_policy("heal").name == "heal"


def test_heal_spec_refuses_a_source_that_receives():
    with pytest.raises(ValueError, match="source"):
        HealSpec(0, 10, (0, 1))


# -- the worker process's record of its live state -------------------------------------------------


def _state():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return {"model": model, "optim": torch.optim.AdamW(model.parameters(), lr=0.1)}


def _step(state):
    state["model"](torch.ones(3, 4)).sum().backward()
    state["optim"].step()
    state["optim"].zero_grad()


def _raise(exc):
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001 - handed on with its traceback
        return e


def test_a_stop_asked_is_taken_at_report_where_the_state_is_whole():
    slot, state = LiveSlot(), _state()
    slot.register(state, 9)
    _step(state)
    slot.stop.set()
    with pytest.raises(Interrupted) as e:
        slot.reported(10)
    assert slot.finish(0, e.value) == LiveState(0, 10, True, "stopped at ctx.report")


def test_an_optimizer_step_not_reported_yet_counts_and_an_error_outside_a_collective_is_doubtful():
    slot, state = LiveSlot(), _state()
    slot.register(state, 9)
    _step(state)  # step 10 applied, the collective of step 11 fails before ctx.report(10)
    ended = slot.finish(0, _raise(RuntimeError("boom")))
    assert not ended.clean and "outside a collective" in ended.why
    slot.begin(keep=True)
    slot.register(state, 9)
    _step(state)
    ended = slot.finish(0, _raise(Interrupted()))
    assert (ended.step, ended.clean) == (10, True)


def test_stopped_inside_an_optimizer_step_or_by_a_forced_interrupt_is_doubtful():
    slot, state = LiveSlot(), _state()
    slot.register(state, 9)
    state["optim"].register_step_pre_hook(lambda *_: (_ for _ in ()).throw(Interrupted()))
    with pytest.raises(Interrupted) as e:
        _step(state)
    ended = slot.finish(0, e.value)
    assert not ended.clean and "inside optimizer.step" in ended.why
    slot2 = LiveSlot()
    slot2.register(_state(), 3)
    slot2.forced = True
    assert not slot2.finish(1, _raise(Interrupted())).clean


def test_a_new_attempt_keeps_the_state_only_to_heal_and_hooks_are_not_stacked():
    slot, state = LiveSlot(), _state()
    slot.register(state, 5)
    slot.begin(keep=True)
    slot.register(state, 5)  # the same optimizer registered again: one pair of hooks
    _step(state)
    assert slot.finish(0, None) == LiveState(0, 6, True, "returned (after the optimizer step of a step not "
                                                         "reported yet)")
    slot.begin(keep=False)
    assert slot.state is None and slot.finish(0, None).step is None


def test_adopt_loads_the_kept_objects_into_a_state_built_anew():
    kept, fresh = _state(), _state()
    _step(kept)
    adopt(kept, fresh)
    for a, b in zip(kept["model"].parameters(), fresh["model"].parameters()):
        assert torch.equal(a, b)
    ka = kept["optim"].state_dict()["state"]
    fa = fresh["optim"].state_dict()["state"]
    assert all(torch.equal(ka[i]["exp_avg"], fa[i]["exp_avg"]) for i in ka)


def test_an_interrupt_never_lands_in_a_thread_being_started():
    # CPython finds a thread by its id, and a thread being started carries its starter's id until
    # it runs: an interrupt raised then killed the new thread, and the training thread (starting a
    # Checkpointer's threads) waited in Thread.start() for ever. Every interrupt must reach the
    # thread meant, however often it starts threads.
    import threading

    from recovery.worker_process import _raise_in

    got: list[int] = []

    def starts_threads() -> None:
        n = 0
        try:
            while n < 20:
                try:
                    while True:
                        t = threading.Thread(target=lambda: None)
                        t.start()
                        t.join()
                except Interrupted:
                    n += 1
        finally:  # (an interrupt landing in the handler itself ends the loop: no hang either)
            got.append(n)

    victim = threading.Thread(target=starts_threads, daemon=True)
    victim.start()
    for _ in range(200):
        if got or not victim.is_alive():
            break
        _raise_in(victim.ident, Interrupted)
        victim.join(0.05)
    victim.join(30)
    assert not victim.is_alive() and got and got[0] >= 1  # interrupted, never stuck in Thread.start()
