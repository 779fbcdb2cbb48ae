"""Fakes shared by the recovery logic tests: a clock the test moves, and a writer's part of a
save written and announced."""

from __future__ import annotations

import torch

import ckpt
from recovery.registry import CheckpointRegistry


class Clock:
    """A clock that moves only when the test says so."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def persist(storage, step, writer, save_id, world=2, rank=0, announce=None):
    """A writer's part of a save, then (``announce``: the registry or a coordinator) its announcement."""
    state = {"w": ckpt.Sharded(torch.full((4,), float(rank + step)), dim=0, rank=rank, world=world)}
    plan = ckpt.plan_save(state, rank=rank, world=world)
    ckpt.write_plan(storage, plan, step=step, writer=writer, save_id=save_id)
    if isinstance(announce, CheckpointRegistry):
        announce.fragment_ready(step, save_id, writer)
    elif announce is not None:
        announce.fragment_ready(0, step, save_id, writer)
