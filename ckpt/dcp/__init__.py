"""Bridges to PyTorch Distributed Checkpoint (``torch.distributed.checkpoint``, DCP).

- :class:`Writer` and :class:`Reader`: DCP's ``StorageWriter``/``StorageReader``, so that
  ``dcp.save``/``dcp.async_save`` write committed ckpt steps and ``dcp.load`` reads any of them;
- :class:`HostStager`: ``dcp.async_save``'s stager on ckpt's budgeted host pool;
- :func:`import_dcp` / :func:`export_dcp`: a DCP checkpoint folder to a ckpt step and back
  (``ckpt import dcp``, ``ckpt export --format dcp``).

See docs/bridges.md. Importing this package imports ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

from .exporter import export_dcp
from .importer import import_dcp
from .metadata import load_metadata
from .reader import Reader
from .stager import HostStager
from .writer import Writer, WriterOptions

__all__ = ["HostStager", "Reader", "Writer", "WriterOptions", "export_dcp", "import_dcp", "load_metadata"]
