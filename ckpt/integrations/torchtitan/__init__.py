"""ckpt as torchtitan's checkpoint manager.

:class:`CkptCheckpointManager` implements torchtitan's ``BaseCheckpointManager`` on
:class:`ckpt.Checkpointer`: lazy snapshots (``save`` returns at once, the device→host copy
overlaps the next forward and backward, ``maybe_wait_for_staging`` before
``optimizers.step()`` waits only for that copy), any fsspec URL as ``checkpoint.folder``, the
node agent when ``checkpoint.agent`` names one, retention from ``keep_latest_k`` and
``keep_every``, and loads into any parallel layout (a save from 2 ranks loads into 1).

torchtitan builds the checkpoint manager from ``Trainer.Config.checkpoint`` (its ``Config``'s
owner class), so the manager is selected by putting its ``Config`` there, either in a
``config_registry`` function::

    from ckpt.integrations.torchtitan import CkptCheckpointManager
    config.checkpoint = CkptCheckpointManager.Config(enable=True, folder="s3://bucket/run1", interval=500)

or, without touching the config function, with torchtitan's override mechanism, which swaps
the existing ``checkpoint`` config for ours and keeps every shared field::

    --override.imports ckpt.integrations.torchtitan.use_ckpt
    --override.imports 'ckpt.integrations.torchtitan.use_ckpt={"agent": "unix:///run/ckpt/agent.sock"}'

Importing this package without torchtitan installed raises an ``ImportError`` that says what
to install. See ``docs/integrations/torchtitan.md``.
"""

from __future__ import annotations

from typing import Any

try:
    from torchtitan.components.checkpointer.base import BaseCheckpointManager
    from torchtitan.config.override import derive, override
except ImportError as e:  # pragma: no cover - exercised in a subprocess without torchtitan
    raise ImportError(
        f"ckpt.integrations.torchtitan needs torchtitan (and its config dependency tyro): "
        f"pip install 'ckpt[torchtitan]' ({e})"
    ) from e

from .manager import RNG, CkptCheckpointManager

__all__ = ["RNG", "CkptCheckpointManager", "use_ckpt"]


@override(
    target=BaseCheckpointManager.Config,
    fqns=["checkpoint"],
    description="ckpt checkpoint manager (lazy snapshots, reshardable format)",
)
def use_ckpt(cfg: BaseCheckpointManager.Config, **options: Any) -> CkptCheckpointManager.Config:
    """torchtitan override: the trainer's ``checkpoint`` config becomes ours, with every field
    it shares with it (``enable``, ``folder``, ``interval``, ``keep_latest_k``, ...) copied and
    ``options`` (our own fields: ``agent``, ``keep_every``, ...) set. Fields only the DCP
    manager has (``async_mode``) are dropped: snapshots here are always asynchronous."""
    if isinstance(cfg, CkptCheckpointManager.Config) and not options:
        return cfg
    return derive(cfg, CkptCheckpointManager.Config, **options)
