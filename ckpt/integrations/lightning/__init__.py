"""ckpt for Lightning (``lightning`` 2.6): checkpoints in ckpt's format, saved lazily.

- :class:`CkptCheckpointIO`: the ``CheckpointIO`` of single-device and DDP training
  (``L.Trainer(plugins=[io], callbacks=[io.callback])``); every ``.ckpt`` path is a ckpt folder.
- :class:`CkptModelParallelStrategy`: ``ModelParallelStrategy`` (FSDP2, tensor parallel) whose
  sharded checkpoints go through ``ckpt.dcp.Writer``/``Reader``: every rank writes its shards.

See docs/integrations/lightning.md. Importing this module without Lightning raises an
``ImportError`` that names the extra to install.
"""

from __future__ import annotations

try:
    import lightning.pytorch  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "ckpt.integrations.lightning needs Lightning 2.6 (the `lightning` package): pip install 'ckpt[lightning]'"
    ) from e

from ._tree import from_ckpt, to_ckpt
from .checkpoint_io import AttachOptimizers, CkptCheckpointIO
from .strategy import CkptModelParallelStrategy

__all__ = ["AttachOptimizers", "CkptCheckpointIO", "CkptModelParallelStrategy", "from_ckpt", "to_ckpt"]
