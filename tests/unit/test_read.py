"""``ckpt.read``: a checkpoint loaded without a template, containers as saved; opaque values."""

from __future__ import annotations

import pytest
import torch

import ckpt
from ckpt.errors import UnsupportedValueError
from ckpt.state import Opaque, container_kinds, decode_value, encode_value, unflatten
from tests.golden.make_golden import RUNS, golden_state_parts
from tests.helpers import bits_equal, random_bits


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and bits_equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _state():
    return {
        "model": {"w": random_bits((5, 3), torch.bfloat16), "layers": [random_bits((2,), torch.float32, 1),
                                                                       random_bits((3, 1), torch.int64, 2)]},
        "pair": (random_bits((4,), torch.float16, 3), {"n": 5}),
        "optim": {"state": {0: {"m": random_bits((2,), torch.float32, 4)}, 7: {"m": random_bits((2,), torch.float32, 5)}},
                  "param_groups": [{"lr": 0.1, "params": [0, 7]}]},
        "mixed": {1: torch.ones(2), "b": torch.zeros(1)},
        "step": 12,
        "cfg": {"betas": (0.9, 0.95), 3: "x", "raw": b"\x00\x01"},
    }


@pytest.mark.parametrize("layout", ["packs", "shards", "chunks"])
def test_read_returns_the_tree_as_saved(tmp_path, layout):
    state = _state()
    ckpt.save(state, str(tmp_path), step=3, layout=layout)
    assert _same(ckpt.read(str(tmp_path)), state)


def test_read_of_a_checkpointer_step_keeps_the_containers(tmp_path):
    state = _state()
    with ckpt.Checkpointer(str(tmp_path)) as c:
        c.save(3, state, force=True).result(60)
    assert _same(ckpt.read(str(tmp_path)), state)


def test_container_kinds_recorded_once_and_compact():
    kinds = container_kinds(_state())
    assert kinds == {"model/layers": "list", "pair": "tuple", "optim/state": "int", "mixed": ["1"]}


def test_read_include_selects_paths_and_keeps_indices(tmp_path):
    state = _state()
    ckpt.save(state, str(tmp_path), step=1)
    got = ckpt.read(str(tmp_path), include=["model/layers/1", "step"])
    assert set(got) == {"model", "step"}
    assert list(got["model"]["layers"]) == [1]  # element 0 left out: a dict keeps the index
    assert bits_equal(got["model"]["layers"][1], state["model"]["layers"][1])
    with pytest.raises(ckpt.CheckpointNotFoundError, match="matches"):
        ckpt.read(str(tmp_path), include="nothing/*")


@pytest.mark.parametrize("version", sorted(RUNS))
def test_read_golden_checkpoints_of_every_version(version):
    full, _ = golden_state_parts()
    got = ckpt.read(str(RUNS[version]))
    assert set(got["model"]) == set(full)
    for k, v in full.items():
        assert bits_equal(got["model"][k], v), k
    assert got["step"] == 42 and got["cfg"] == {"betas": (0.9, 0.95), "name": "golden"}


def test_opaque_values_round_trip_and_need_allow_pickle(tmp_path):
    import io

    buf = io.BytesIO()
    torch.save({"fn": print}, buf)  # a global weights_only refuses
    enc = encode_value({"a": Opaque(buf.getvalue()), "b": 1}, allow_pickle=False, where="x")
    with pytest.raises(UnsupportedValueError, match="allow_pickle"):
        decode_value(enc, allow_pickle=False, where="x")
    kept = decode_value(enc, allow_pickle=False, where="x", opaque=True)
    assert kept == {"a": Opaque(buf.getvalue()), "b": 1}
    assert decode_value(enc, allow_pickle=True, where="x")["a"] == {"fn": print}


def test_unflatten_refuses_a_path_that_is_both_value_and_container():
    with pytest.raises(ckpt.LayoutError):
        unflatten({"a": 1, "a/b": 2})
