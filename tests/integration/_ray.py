"""recovery.run with the settings of the recovery tests."""

from __future__ import annotations

from typing import Any


def run_job(trainer: Any, tmp_path: Any, fast: dict[str, Any], **kw: Any) -> Any:
    """``recovery.run`` of ``trainer`` with ``fast`` settings, a quarter CPU and one slot per worker."""
    import recovery

    opts = dict(fast, resources_per_worker={"CPU": 0.25, "slot": 1}, every_n_steps=5, keep_last=None)
    opts.update(kw)
    return recovery.run(trainer, storage=str(tmp_path / "run"), **opts)
