"""Retention reads no manifest it does not need: a training process runs it after every commit,
and parsing the kept steps' manifests there held the GIL for tens of ms at real shapes."""

from __future__ import annotations

import os
import time

import torch

import ckpt
from ckpt import format as fmt
from ckpt.retention import RetentionPolicy, run_gc
from ckpt.storage import LocalStorage
from tests.helpers import DelegatingStorage


class CountingReads(DelegatingStorage):
    def __init__(self, inner):
        super().__init__(inner)
        self.reads: list[str] = []

    def read(self, path, *args, **kwargs):
        self.reads.append(path)
        return super().read(path, *args, **kwargs)


def _manifest_reads(st: CountingReads) -> list[str]:
    return [p for p in st.reads if p.endswith("/" + fmt.META)]


def _run(tmp_path, steps):
    for s in steps:
        ckpt.save({"w": torch.full((4,), float(s))}, str(tmp_path), step=s)
    return CountingReads(LocalStorage(str(tmp_path)))


def test_committed_steps_only_read_no_manifest(tmp_path):
    st = _run(tmp_path, [1, 2, 3, 4])
    result = run_gc(st, RetentionPolicy(keep_last=2), measure=False)
    assert sorted(result.deleted) == [1, 2]
    assert _manifest_reads(st) == []
    assert fmt.committed_steps(st) == [3, 4]


def _incomplete(tmp_path, step: int, mtime: float) -> None:
    d = tmp_path / fmt.step_dir(step)
    d.mkdir()
    (d / "partial").write_bytes(b"x")
    os.utime(d / "partial", (mtime, mtime))


def test_an_incomplete_step_before_the_newest_is_judged_by_the_newest_commit_time(tmp_path):
    st = _run(tmp_path, [1, 3])
    created = fmt.read_manifest(st, 3).created_at
    st.reads.clear()
    _incomplete(tmp_path, 2, created - 30)  # abandoned before step 3 committed
    policy = RetentionPolicy(keep_last=2, min_age_s=3600)
    result = run_gc(st, policy, measure=False, dry_run=True, now=time.time())
    by_step = {d.step: d for d in result.plan.decisions}
    assert by_step[2].action == "delete" and "untouched since committed step 3" in by_step[2].reason
    assert _manifest_reads(st) == [f"{fmt.step_dir(3)}/{fmt.META}"]  # the newest's alone

    # Written to after the newest committed: may be a save in progress, kept.
    os.utime(tmp_path / fmt.step_dir(2) / "partial", (created + 30, created + 30))
    result = run_gc(st, policy, measure=False, dry_run=True, now=created + 60)
    assert {d.step: d.action for d in result.plan.decisions}[2] == "keep"


def test_a_known_commit_time_is_not_read_again(tmp_path):
    st = _run(tmp_path, [1, 3])
    created = fmt.read_manifest(st, 3).created_at
    _incomplete(tmp_path, 2, created - 30)
    st.reads.clear()
    result = run_gc(st, RetentionPolicy(keep_last=2, min_age_s=3600), measure=False, committed_at={3: created})
    assert result.deleted == [2]
    assert _manifest_reads(st) == []


def test_a_checkpointer_reads_no_manifest_after_its_commits(tmp_path):
    state = {"w": torch.zeros(8)}
    with ckpt.Checkpointer(str(tmp_path), every_n_steps=1, keep_last=2) as ck:
        counting = ck.storage = CountingReads(ck.storage)  # what its retention reads
        for step in range(1, 6):
            state["w"].fill_(step)
            ck.save(step, state)
            ck.wait()
    assert fmt.committed_steps(LocalStorage(str(tmp_path))) == [4, 5]
    assert _manifest_reads(counting) == []


def test_a_checkpointer_keeps_a_bounded_number_of_finished_handles(tmp_path):
    """Every handle holds its fragment and manifest: a job checkpointing every step must not
    keep all of them (memory, and the cycle collector walking them)."""
    from ckpt.handles import HandleLog

    state = {"w": torch.zeros(8)}
    with ckpt.Checkpointer(str(tmp_path), every_n_steps=1, keep_last=1) as ck:
        ck._handles = HandleLog(keep=4)
        for step in range(1, 21):
            state["w"].fill_(step)
            ck.save(step, state)
            ck.wait()
        st = ck.status()
        assert len(ck._handles) <= 8 and [r["step"] for r in st.checkpoints][-4:] == [17, 18, 19, 20]
        assert st.last_committed == 20 and st.failed == 0
    assert ckpt.read(str(tmp_path))["w"].tolist() == [20.0] * 8
