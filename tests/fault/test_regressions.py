"""Regression tests for bugs the fault tests found in ckpt/ and agent/."""

from __future__ import annotations

import torch

import ckpt
from ckpt.cli import main as cli


def test_gc_min_age_0_removes_an_incomplete_step_that_holds_no_file(tmp_path):
    # A save that failed at once (disk full) leaves a step directory with empty subdirectories:
    # no file, so no file time. `ckpt gc --min-age 0` kept it forever when it was newer than
    # the newest committed step.
    ckpt.save({"w": torch.ones(3)}, str(tmp_path), step=1)
    (tmp_path / "000000000002" / "w").mkdir(parents=True)
    assert cli(["gc", str(tmp_path), "--keep-last", "1", "--min-age", "0"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000000001"]
