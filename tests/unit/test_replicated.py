"""ckpt.replicated's decisions, without processes: which restores read replicated arrays once,
how the arrays are spread over the ranks, and the setting's validation."""

from __future__ import annotations

import pytest
import torch

import ckpt
from ckpt import replicated
from ckpt.restore import RestoreSource, StorageSource, Tier
from ckpt.storage import LocalStorage


class _Memory(RestoreSource):
    tier = Tier.AGENT_MEMORY


def test_auto_reads_once_from_storage_and_each_from_an_agents_memory(tmp_path):
    storage = LocalStorage(str(tmp_path))
    assert not replicated._reads_memory(storage)
    assert not replicated._reads_memory(StorageSource(storage))
    assert replicated._reads_memory(_Memory(StorageSource(storage)))


def test_arrays_are_spread_over_the_ranks_by_size_the_same_way_everywhere():
    shared = {f"a{i}": torch.empty(n) for i, n in enumerate([100, 90, 80, 10, 10, 10, 5, 1])}
    owner = replicated._assign(shared, 3)
    assert owner == replicated._assign(dict(reversed(list(shared.items()))), 3)  # independent of order
    load = [sum(shared[p].numel() for p, r in owner.items() if r == k) for k in range(3)]
    assert sum(load) == 306 and max(load) - min(load) <= 10 and set(owner.values()) == {0, 1, 2}


def test_only_plain_tensors_are_shared():
    state = {"w": torch.ones(3), "s": ckpt.Sharded(torch.ones(2), dim=0, rank=0, world=2), "n": 3}
    assert set(replicated._whole_tensors(state)) == {"w"}


def test_the_setting_is_checked(tmp_path):
    with pytest.raises(ValueError, match="replicated_reads"):
        ckpt.Checkpointer(str(tmp_path / "run"), replicated_reads="twice")
