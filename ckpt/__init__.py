"""ckpt: distributed checkpointing for PyTorch in a universal, reshardable zarr v3 format."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import LoadPlan, SavePlan, execute_load, load, plan_load, plan_save, save, write_plan
from .checkpointer import Checkpointer, CheckpointerConfig, CheckpointerStatus, SnapshotHandle, SnapshotState
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
from .format import commit, committed_steps, list_steps, read_manifest
from .layout import Sharded
from .hostpool import Allocator, HostBufferPool, Slab
from .sink import InProcessSink, PersistJob, Sink, SinkConfig, open_sink
from .stateful import OptimizerState, RNGState
from .manifest import ArraySpec, Fragment, Manifest
from .storage import RetryPolicy, Storage, open_storage

__all__ = [
    "__version__",
    "save",
    "load",
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
