"""Stragglers and hang culprits: the coordinator's detection from the compute timing the
heartbeats carry (synthetic heartbeats, no processes)."""

from __future__ import annotations

import pytest

from recovery.config import DetectConfig
from recovery.coordinator import Coordinator
from recovery.detect import HANG, STRAGGLER, Membership

# -- stragglers -------------------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class _Ranks:
    """Synthetic heartbeats: every ``dt`` each rank sends its running compute totals, having done
    ``per_beat`` sections of ``speed(rank, t)`` seconds each since its last heartbeat."""

    def __init__(self, m: Membership, world: int, speed, *, dt: float = 0.5, per_beat: int = 5, measured=True):
        self.m, self.world, self.speed, self.dt, self.per_beat, self.measured = m, world, speed, dt, per_beat, measured
        self.totals = {r: (0, 0.0) for r in range(world)}
        self.t = 0.0
        self.step = 0
        self.changes: list = []
        self.failures: list = []

    def run_until(self, t_end: float, **kw) -> list:
        out = []
        while self.t + self.dt <= t_end + 1e-9:
            self.t = round(self.t + self.dt, 9)
            self.step += self.per_beat
            for r in range(self.world):
                n, s = self.totals[r]
                self.totals[r] = (n + self.per_beat, s + self.per_beat * self.speed(r, self.t))
                self.m.heartbeat(0, r, self.world, self.step, {}, now=self.t, node=f"node{r // 4}",
                                 timing=(*self.totals[r], self.measured))
            changes, failures = self.m.check_stragglers(self.t)
            out += changes
            self.changes += changes
            self.failures += failures
        return out


def _straggler_config(**kw) -> DetectConfig:
    return DetectConfig(**{"straggler_window_s": 10.0, "straggler_min_steps": 5, "straggler_factor": 1.5,
                           "hang_timeout_s": 60, **kw})


def test_a_rank_slow_from_the_start_is_a_straggler_once_its_window_is_full_not_before():
    m = Membership(_straggler_config())
    m.begin_attempt(0, 8, now=0)
    feed = _Ranks(m, 8, lambda r, t: 0.2 if r == 3 else 0.1)
    assert feed.run_until(9.5) == []  # measured for less than a window: nobody judged yet
    (c,) = feed.run_until(11.0)
    assert (c.rank, c.node, c.slow, c.measured) == (3, "node0", True, True)
    assert c.step_time_s == pytest.approx(0.2) and c.peers_s == pytest.approx(0.1) and c.factor == pytest.approx(2.0)
    assert c.at == 10.5  # the first round with a whole window measured (the baseline came at t=0.5)
    fields = c.to_fields()
    assert (fields["state"], fields["signal"], fields["factor"], fields["rank"]) == ("slow", "compute", 2.0, 3)
    assert m.progress()["stragglers"] == {3: 2.0}
    assert feed.run_until(40.0) == []  # reported once, not every round


def test_a_slowdown_is_reported_when_most_of_the_window_is_slow_and_recovery_too():
    m = Membership(_straggler_config())
    m.begin_attempt(0, 8, now=0)
    feed = _Ranks(m, 8, lambda r, t: 0.2 if r == 5 and 20 < t <= 40 else 0.1)
    assert feed.run_until(20.0) == []
    assert feed.run_until(23.5) == []  # slow for a third of the window: the median is still fast
    (c,) = feed.run_until(28.0)  # slow for over half of it
    assert c.rank == 5 and c.slow and 25.0 <= c.at <= 27.0, c
    assert feed.run_until(43.5) == []  # fast again, but not for half a window yet
    (r,) = feed.run_until(50.0)
    assert (r.rank, r.slow, r.since) == (5, False, c.at) and r.factor < 1.5 - 0.5 / 4
    assert m.progress()["stragglers"] == {}
    assert r.to_fields()["state"] == "recovered"


def test_a_uniform_slowdown_or_a_single_pause_flags_nobody():
    m = Membership(_straggler_config())
    m.begin_attempt(0, 16, now=0)
    # every rank 3x slower from t=15 (a slower input pipeline, a smaller learning-rate phase...),
    # and rank 7 paused once for 3 s (a checkpoint, a garbage collection) at t=30
    feed = _Ranks(m, 16, lambda r, t: 0.3 if t > 15 else 0.1)
    feed.run_until(29.5)
    n, s = feed.totals[7]
    feed.totals[7] = (n, s + 3.0)
    feed.run_until(60.0)
    assert feed.changes == [] and m.progress()["stragglers"] == {}


def test_ranks_too_few_steps_or_alone_are_not_judged():
    m = Membership(_straggler_config(straggler_min_steps=50))
    m.begin_attempt(0, 4, now=0)
    feed = _Ranks(m, 4, lambda r, t: 1.0 if r == 0 else 0.1, per_beat=1)  # 20 steps per window
    assert feed.run_until(30.0) == []
    alone = Membership(_straggler_config())
    alone.begin_attempt(0, 1, now=0)
    assert _Ranks(alone, 1, lambda r, t: 1.0).run_until(30.0) == []


def test_two_ranks_compare_each_with_the_other():
    # the peers' median leaves the rank out: with two ranks, each is compared with the other
    m = Membership(_straggler_config())
    m.begin_attempt(0, 2, now=0)
    (c,) = _Ranks(m, 2, lambda r, t: 0.2 if r == 1 else 0.1).run_until(12.0)
    assert (c.rank, c.factor) == (1, pytest.approx(2.0))


def test_a_new_process_or_a_switch_to_measured_compute_starts_measuring_over():
    m = Membership(_straggler_config())
    m.begin_attempt(0, 4, now=0)
    feed = _Ranks(m, 4, lambda r, t: 0.2 if r == 2 else 0.1, measured=False)
    feed.run_until(8.0)
    feed.measured = True  # the ranks began to time their compute: a new window for each
    assert feed.run_until(17.5) == []
    (c,) = feed.run_until(19.0)
    assert c.rank == 2 and c.measured


def test_a_persistent_straggler_becomes_a_failure_once_when_replacement_is_on():
    m = Membership(_straggler_config(replace_stragglers_after_s=5.0))
    m.begin_attempt(0, 8, now=0)
    feed = _Ranks(m, 8, lambda r, t: 0.25 if r == 6 else 0.1)
    feed.run_until(15.0)
    assert feed.failures == []
    feed.run_until(30.0)
    (f,) = feed.failures
    assert (f.kind, f.ranks, f.culprits, f.node) == (STRAGGLER, (6,), (6,), "node1")
    assert f.detected_at == pytest.approx(feed.changes[0].at + 5.0) and "has been a straggler for 5.0 s" in f.detail
    assert "2.50x its peers" in f.detail


def test_a_round_at_ten_thousand_ranks_is_linear_in_ranks():
    import sys

    def one_round(n: int) -> tuple[int, int]:
        m = Membership(_straggler_config(hang_timeout_s=5))
        m.begin_attempt(0, n, now=0)
        slow = n // 3
        totals, flagged = {}, []
        for t in range(1, 13):  # a whole window of heartbeats, one a second
            for r in range(n):
                totals[r] = (10 * t, 10 * t * (0.2 if r == slow else 0.1))
                m.heartbeat(0, r, n, t, {}, now=float(t), timing=(*totals[r], True))
            flagged += [c.rank for c in m.check_stragglers(float(t))[0]]  # the rounds fold what arrived
        assert flagged == [slow]
        lines = 0

        def tracer(frame, event, arg):
            nonlocal lines
            if event == "line":
                lines += 1
            return tracer

        sys.settrace(tracer)
        try:
            m.check_stragglers(12.5)  # a round like any other: every rank measured, one a straggler
            hangs = m.check(30.0)  # every rank stalled: the hang round too
        finally:
            sys.settrace(None)
        assert m.progress()["stragglers"] == {slow: 2.0} and hangs[0].culprits != ()
        return lines, m.stragglers.work

    lines_1k, work_1k = one_round(1_000)
    lines_10k, work_10k = one_round(10_000)
    # Python lines run and cells the arrays' operations touched grow 10x for 10x the ranks, not 100x
    assert lines_10k <= 11 * lines_1k, (lines_1k, lines_10k)
    assert work_10k == pytest.approx(10 * work_1k, rel=0.01) and work_10k <= 60 * 10_000, (work_1k, work_10k)


def test_a_hang_culprit_is_the_rank_without_the_steps_compute_the_others_finished():
    # Data parallel: every rank stops at step 12, the others inside step 13's all-reduce with
    # its compute done (14 sections), rank 2 stuck before it (13). Same step, same second.
    m = Membership(_straggler_config(hang_timeout_s=5))
    m.begin_attempt(0, 4, now=0)
    for r in range(4):
        m.heartbeat(0, r, 4, 12, {}, now=1.0 + r * 0.01, timing=(13 if r == 2 else 14, 1.3, True))
    (f,) = m.check(now=7.0)
    assert f.kind == HANG and f.culprits == (2,) and set(f.ranks) == {0, 1, 2, 3}
    assert "rank 2 stuck at step 12" in f.detail and "3 rank(s) waiting behind it" in f.detail
    # without measured compute the ranks cannot be told apart: all four are named, as before
    m2 = Membership(_straggler_config(hang_timeout_s=5))
    m2.begin_attempt(0, 4, now=0)
    for r in range(4):
        m2.heartbeat(0, r, 4, 12, {}, now=1.0 + r * 0.01, timing=(12, 1.3, False))
    assert m2.check(now=7.0)[0].culprits == (0, 1, 2, 3)


def test_a_hang_report_says_which_culprit_was_a_straggler():
    m = Membership(_straggler_config(hang_timeout_s=5))
    m.begin_attempt(0, 4, now=0)
    feed = _Ranks(m, 4, lambda r, t: 0.3 if r == 1 else 0.1)
    feed.run_until(12.0)
    assert [c.rank for c in feed.changes] == [1]
    for r in range(4):  # rank 1 stops before the compute of the next step; the others wait for it
        n, s = feed.totals[r]
        m.heartbeat(0, r, 4, feed.step, {}, now=12.2, timing=(n + (r != 1), s + 0.1, True))
    (f,) = m.check(now=18.0)
    assert f.culprits == (1,) and "reported a straggler before: rank 1 (3.0x its peers' compute time)" in f.detail


def test_the_coordinator_notes_stragglers_from_relayed_heartbeats_and_old_heartbeats_still_count():
    clock = Clock(0.0)
    c = Coordinator("memory://straggler-unit", _straggler_config(), clock=clock, start=False)
    c.begin_attempt(0, 4)
    for t in range(1, 14):
        clock.t = float(t)
        beats = [("heartbeat", (0, r, 4, t, {}, f"n{r // 2}", "run", (10 * t, t * (2.0 if r == 3 else 1.0), True)))
                 for r in range(3, -1, -1)]
        c.relayed("n0", {"state": "ok"}, beats)
        c.heartbeat(0, 0, 4, t, {}, "n0", "run")  # a heartbeat without timing (an older worker): still a heartbeat
        c.detect_round()
    notes = [n for n in c.poll()["notes"] if n["kind"] == "straggler"]
    (note,) = notes
    assert (note["fields"]["rank"], note["fields"]["node"], note["fields"]["state"]) == (3, "n1", "slow")
    assert note["fields"]["factor"] == pytest.approx(2.0) and note["fields"]["attempt"] == 0
    assert note["message"].startswith("rank 3 on node n1 is a straggler: compute time 200.0 ms per step")


def test_reporter_timing_totals():
    from recovery.worker import Reporter

    rep = Reporter(None, 0, 0, 1, None, 0.2)
    rep.heartbeat(0, {})
    rep.heartbeat(1, {})
    sections, seconds, measured = rep.timing
    assert (sections, measured) == (1, False) and seconds >= 0  # no compute timed: the time between reports
    rep.compute_time(0.25)  # measured compute from now on: the totals start over
    with rep.timed(), rep.timed():  # nested: counted once
        pass
    rep.heartbeat(2, {})
    sections, seconds, measured = rep.timing
    assert (sections, measured) == (2, True) and 0.25 <= seconds < 1.0
    with pytest.raises(ValueError, match="finite number of seconds"):
        rep.compute_time(float("nan"))


def test_straggler_config_is_validated():
    with pytest.raises(ValueError, match="straggler_factor must be above 1"):
        DetectConfig(straggler_factor=1.0)
    with pytest.raises(ValueError, match="straggler_min_steps"):
        DetectConfig(straggler_min_steps=0)
    with pytest.raises(ValueError, match="replace_stragglers_after_s"):
        DetectConfig(replace_stragglers_after_s=0)
    with pytest.raises(ValueError, match="straggler_window_s"):
        DetectConfig(straggler_window_s=-1)
    d = DetectConfig()
    assert (d.straggler_factor, d.straggler_window_s, d.straggler_min_steps, d.replace_stragglers_after_s) == \
        (1.5, 30.0, 5, None)


def test_reporter_reads_cuda_timings_once_the_gpu_passed_them_in_order():
    from recovery.worker import Reporter

    class Event:  # what Reporter uses of torch.cuda.Event
        def __init__(self, at_ms: float, done: bool = True) -> None:
            self.at_ms, self.done = at_ms, done

        def query(self) -> bool:
            return self.done

        def elapsed_time(self, end: Event) -> float:
            return end.at_ms - self.at_ms

    rep = Reporter(None, 0, 0, 1, None, 0.2)
    late = Event(300.0, done=False)
    rep._pending.extend([(Event(0.0), Event(40.0)), (Event(100.0), late), (Event(400.0), Event(450.0))])
    assert rep.timing == (1, pytest.approx(0.04), True)  # the second is not done: it and the third wait
    late.done = True
    assert rep.timing == (3, pytest.approx(0.04 + 0.2 + 0.05), True) and not rep._pending


def test_the_first_step_of_an_attempt_is_sent_at_once_and_remembered_by_the_coordinator():
    """How long recovery took is read from when each rank's first step arrived, not from when
    the driver next polled: the Reporter sends that step at once, the coordinator keeps its time."""
    from recovery.detect import DetectConfig, Membership
    from recovery.worker import Reporter

    sent: list[int | None] = []
    rep = Reporter(None, 0, 0, 1, None, 60.0)  # a heartbeat a minute: only forced ones go now
    rep.flush = lambda: sent.append(rep._step)  # type: ignore[method-assign]
    rep.heartbeat(None, {}, force=True)
    rep.heartbeat(31, {})
    rep.heartbeat(32, {})
    assert sent == [None, 31]
    m = Membership(DetectConfig())
    m.begin_attempt(1, 2, now=0)
    m.heartbeat(1, 0, 2, None, {}, now=1)
    m.heartbeat(1, 0, 2, 31, {}, now=2)
    m.heartbeat(1, 0, 2, 32, {}, now=3)
    ranks = m.progress()["ranks"]
    assert (ranks[0]["first_progress_at"], ranks[0]["progress_at"], ranks[1]["first_progress_at"]) == (2, 3, None)
