"""Random byte flips, truncations and deletions in the chunks (packs, shards, chunk files),
fragments and metadata of a committed checkpoint: always detected by ``ckpt verify`` and by load,
naming the tensor and chunk; load never returns other data than was saved (see corruption.py)."""

from __future__ import annotations

import pytest

from .corruption import CLASSES, run


def _check(out: dict) -> None:
    for key in ("undetected_by_verify", "load_wrong", "chunk_not_named", "cli_missed"):
        assert out[key] == [], f"{key}: {out[key][:5]}"
    # every class of file was hit by every kind of mutation
    assert set(out["by_class"]) == CLASSES[out["layout"]]
    assert set(out["by_mutation"]) == {"flip", "truncate", "delete"}
    assert "CorruptCheckpointError" in out["load"] and "FormatError" in out["load"]
    if out["layout"] != "packs":  # a packs step is 5 files here, every one of which load reads
        assert "exact" in out["load"]


@pytest.mark.parametrize("layout", ["packs", "shards", "chunks"])
def test_random_corruption_is_always_detected(tmp_path, layout):
    _check(run(160, seed=0, workdir=str(tmp_path), layout=layout))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["packs", "shards", "chunks"])
def test_random_corruption_is_always_detected_long(tmp_path, layout):
    out = run(5000, seed=1, workdir=str(tmp_path), layout=layout)
    _check(out)
    assert out["trials"] == 5000
