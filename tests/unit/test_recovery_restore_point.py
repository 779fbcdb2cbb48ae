"""Where a restarted job resumes (``recovery.restore``): the restore point's tiers, what they
may be, and the directory of which agents hold each writer's snapshot."""

from __future__ import annotations

import pytest

from ckpt.restore import Tier
from recovery.restore import RestorePoint


def test_restore_point_tiers():
    assert RestorePoint(None).expected_tier == "none"
    assert RestorePoint(3).expected_tier == "storage"
    assert RestorePoint(3, {"a": Tier.AGENT_MEMORY, "b": Tier.AGENT_MEMORY}).expected_tier == Tier.AGENT_MEMORY


def test_the_directory_of_holders_names_the_agents_of_committed_snapshots_of_the_step():
    from recovery.restore import holders_of

    peer = {"n1": "10.0.0.1:7000", "n2": "10.0.0.2:7000", "n3": ""}
    rows = [{"writer": "w0", "step": 5, "state": "committed", "node": "n1"},
            {"writer": "w0", "step": 5, "state": "committed", "node": "n2"},  # a replica
            {"writer": "w1", "step": 5, "state": "committed", "node": "n2"},
            {"writer": "w2", "step": 5, "state": "persisted", "node": "n1"},  # no save to match: not named
            {"writer": "w3", "step": 4, "state": "committed", "node": "n1"},  # another step
            {"writer": "w4", "step": 5, "state": "committed", "node": "n3"},  # an agent without an address
            {"writer": "w5", "step": 5, "state": "committed", "node": "gone"}]  # a node no longer in the fleet
    assert holders_of(5, rows, peer) == {"w0": ("10.0.0.1:7000", "10.0.0.2:7000"), "w1": ("10.0.0.2:7000",)}


def test_a_snapshot_of_the_committing_save_is_a_holder_before_its_agent_hears_of_the_commit():
    """A replica whose origin's node was lost before the commit reached it stays persisted until
    its agent takes it over: it holds the committed bytes all the same, and is named. Another
    save's snapshot of the step (a save rolled back and redone) and a failed one are not."""
    from recovery.restore import holders_of, of_the_save

    peer = {"n1": "10.0.0.1:7000", "n2": "10.0.0.2:7000"}
    rows = [{"writer": "w0", "step": 5, "save_id": "s", "state": "committed", "node": "n1"},
            {"writer": "w1", "step": 5, "save_id": "s", "state": "persisted", "node": "n1"},  # a replica
            {"writer": "w1", "step": 5, "save_id": "s", "state": "staged", "node": "n2"},
            {"writer": "w2", "step": 5, "save_id": "old", "state": "committed", "node": "n2"},
            {"writer": "w3", "step": 5, "save_id": "s", "state": "failed", "node": "n2"}]
    assert holders_of(5, rows, peer, "s") == {"w0": ("10.0.0.1:7000",), "w1": ("10.0.0.1:7000", "10.0.0.2:7000")}
    assert [of_the_save(r, 5, "s") for r in rows] == [True, True, True, False, False]
    assert not of_the_save(rows[0], 6, "s")


def test_restore_point_speaks_tiers_only():
    from recovery.restore import writer_tiers

    with pytest.raises(TypeError, match="ckpt.restore.Tier"):
        RestorePoint(3, {"a": "memory"})
    held = {("w0", False), ("w1", True), ("w0", True)}
    assert writer_tiers(["w0", "w1", "w2"], held) == {"w0": Tier.AGENT_MEMORY, "w1": Tier.PEER, "w2": Tier.STORAGE}
    assert RestorePoint(3, {"a": Tier.PEER}).expected_tier == "peer"


# -- configuration ------------------------------------------------------------------------------------
