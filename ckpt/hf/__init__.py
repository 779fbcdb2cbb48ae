"""Bridges to Hugging Face checkpoints (``save_pretrained`` folders of safetensors files).

- :func:`import_hf`: a ``save_pretrained`` folder becomes a committed step (``ckpt import hf``);
- :func:`export_hf`: a committed step becomes a folder ``from_pretrained`` reads
  (``ckpt export --format hf``).

See docs/bridges.md. transformers is imported only to learn which weights a model ties, when a
``config.json`` is at hand.
"""

from __future__ import annotations

from .exporter import export_hf
from .importer import import_hf

__all__ = ["export_hf", "import_hf"]
