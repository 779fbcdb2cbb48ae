"""ckpt: distributed checkpointing for PyTorch in a universal, reshardable zarr v3 format."""

from __future__ import annotations

from .api import load, read, save
from .checkpointer import Checkpointer, CheckpointerConfig, CheckpointerStatus, SnapshotHandle
from .handles import SnapshotState
from .commit import commit
from .errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptError,
    CommitError,
    CorruptCheckpointError,
    FormatError,
    LayoutError,
    StateMismatchError,
    StorageError,
    UnsupportedValueError,
)
from .format import committed_steps, list_steps, read_manifest
from .hostpool import Allocator, HostBufferPool, Slab
from .io import execute_load, write_plan
from .layout import Sharded
from .manifest import ArraySpec, Fragment, Manifest
from .plan import LoadPlan, SavePlan, plan_load, plan_save
from .restore import RestoreSource, StorageSource, Tier
from .sink import InProcessSink, PersistJob, Sink, SinkConfig, open_sink
from .stateful import OptimizerState, RNGState
from .storage import RetryPolicy, Storage, StorageWrapper, open_storage
from .version import __version__

__all__ = [
    "__version__",
    "save",
    "load",
    "read",
    "Sharded",
    "Checkpointer",
    "CheckpointerConfig",
    "CheckpointerStatus",
    "SnapshotHandle",
    "SnapshotState",
    "OptimizerState",
    "RNGState",
    "Sink",
    "InProcessSink",
    "PersistJob",
    "SinkConfig",
    "open_sink",
    "HostBufferPool",
    "Slab",
    "Allocator",
    "plan_save",
    "write_plan",
    "commit",
    "plan_load",
    "execute_load",
    "SavePlan",
    "LoadPlan",
    "list_steps",
    "committed_steps",
    "read_manifest",
    "open_storage",
    "Storage",
    "RetryPolicy",
    "StorageWrapper",
    "RestoreSource",
    "StorageSource",
    "Tier",
    "Manifest",
    "ArraySpec",
    "Fragment",
    "CkptError",
    "CheckpointNotFoundError",
    "CheckpointExistsError",
    "CorruptCheckpointError",
    "StateMismatchError",
    "LayoutError",
    "FormatError",
    "CommitError",
    "StorageError",
    "UnsupportedValueError",
]


def __getattr__(name: str) -> object:
    """``ckpt.dcp`` and ``ckpt.hf`` (the bridges) are imported on first use: ``import ckpt``
    stays free of torch.distributed.checkpoint and transformers."""
    if name in ("dcp", "hf"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ckpt' has no attribute {name!r}")
