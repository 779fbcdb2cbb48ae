"""Save and load through s3fs against a local S3-compatible server (moto) on loopback."""

from __future__ import annotations

import pytest
import torch

import ckpt

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from .s3_server import moto_endpoint, s3_options  # noqa: E402


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_endpoint("ckpt-test") as endpoint:
        yield endpoint


def test_save_load_and_commit_on_s3(s3_endpoint):
    url = "s3://ckpt-test/run1"
    opts = s3_options(s3_endpoint)
    state = {"w": torch.randn(33, 7), "b": torch.randn(7).bfloat16(), "step": 3}
    m = ckpt.save(state, url, step=3, storage_options=opts, max_chunk_bytes=256)
    assert m.arrays["w"].num_chunks > 1
    storage = ckpt.open_storage(url, storage_options=opts)
    assert ckpt.committed_steps(storage) == [3]
    out = {"w": torch.zeros(33, 7), "b": torch.zeros(7, dtype=torch.bfloat16), "step": 0}
    assert ckpt.load(out, url, storage_options=opts) == 3
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"]) and out["step"] == 3
    # The commit point on an object store is a single PUT: no temp objects or renames left.
    files = storage.walk(ckpt.format.step_dir(3))
    assert not [f for f in files if f.endswith(".tmp")]


def test_uncommitted_step_is_invisible_on_s3(s3_endpoint):
    url = "s3://ckpt-test/run2"
    opts = s3_options(s3_endpoint)
    ckpt.save({"w": torch.ones(4)}, url, step=1, storage_options=opts)
    storage = ckpt.open_storage(url, storage_options=opts)
    plan = ckpt.plan_save({"w": torch.full((4,), 2.0)})
    ckpt.write_plan(storage, plan, step=2, writer="rank00000", save_id="x")  # never committed
    assert [(s.step, s.committed) for s in ckpt.list_steps(storage)] == [(1, True), (2, False)]
    out = {"w": torch.zeros(4)}
    assert ckpt.load(out, url, storage_options=opts) == 1 and torch.equal(out["w"], torch.ones(4))
