"""ckpt for Hugging Face training loops: the ``transformers.Trainer`` and ``accelerate``.

- :class:`CkptCallback`: a ``TrainerCallback`` that takes the Trainer's checkpoints with a
  :class:`ckpt.Checkpointer` (lazy: the host copy overlaps the next forward and backward) instead
  of the Trainer's own ``torch.save`` folders, and resumes a Trainer bit-exactly from them
  (weights, optimizer, scheduler, RNG, data order). What the Trainer needs to resume, its
  ``trainer_state.json``, lives in a small ``checkpoint-N`` *pointer folder* (see
  :mod:`ckpt.integrations.hf.pointer`).
- :class:`AcceleratorCheckpointer`: ``save_state``/``load_state`` for an ``accelerate`` loop, one
  ckpt step covering every prepared model, optimizer, scheduler, the grad scaler, the RNGs and
  the objects registered with ``accelerator.register_for_checkpointing``.

See docs/integrations/hf.md. This package is not the ``ckpt.hf`` format bridge (import and
export of ``save_pretrained`` folders).
"""

from __future__ import annotations

try:
    import accelerate  # noqa: F401
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised with the frameworks hidden
    raise ImportError(
        f"ckpt.integrations.hf needs transformers and accelerate ({e}); install them with: pip install 'ckpt[hf]'"
    ) from e

from .accelerator import AcceleratorCheckpointer
from .pointer import Pointer, read_pointer, write_pointer
from .trainer import CkptCallback

__all__ = ["AcceleratorCheckpointer", "CkptCallback", "Pointer", "read_pointer", "write_pointer"]
