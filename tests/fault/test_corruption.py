"""Random byte flips, truncations and deletions in chunks, fragments and metadata of a
committed checkpoint: always detected by ``ckpt verify`` and by load, naming the tensor and
chunk; load never returns other data than was saved (see corruption.py)."""

from __future__ import annotations

import pytest

from .corruption import run


def _check(out: dict) -> None:
    for key in ("undetected_by_verify", "load_wrong", "chunk_not_named", "cli_missed"):
        assert out[key] == [], f"{key}: {out[key][:5]}"
    # every class of file was hit by every kind of mutation
    assert set(out["by_class"]) == {"chunk", "fragment", "array/group metadata", "commit point"}
    assert set(out["by_mutation"]) == {"flip", "truncate", "delete"}
    assert "exact" in out["load"] and "CorruptCheckpointError" in out["load"] and "FormatError" in out["load"]


def test_random_corruption_is_always_detected(tmp_path):
    _check(run(160, seed=0, workdir=str(tmp_path)))


@pytest.mark.slow
def test_random_corruption_is_always_detected_long(tmp_path):
    out = run(5000, seed=1, workdir=str(tmp_path))
    _check(out)
    assert out["trials"] == 5000
