"""DCP metadata: read from a ``.metadata`` file without running its code, and made from a ckpt
manifest (what the reader hands DCP's load planner, what an export writes).

A DCP ``.metadata`` file is a raw pickle. Torch's weights-only unpickler cannot read it, and
plain ``pickle.load`` runs whatever the file asks for. :func:`load_metadata` unpickles it with
an allow-list of exactly the globals such a file uses: DCP's metadata dataclasses, its storage
info record, ``torch.Size``, torch dtypes, the layout helper and ``pathlib`` paths. A file that
asks for anything else is refused with :class:`~ckpt.errors.UnsafeCheckpointError`, before
any of it is used.
"""

from __future__ import annotations

import io
import pickle
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ..dtypes import info_by_name
from ..errors import FormatError, LayoutError, UnsafeCheckpointError
from ..layout import Box
from ..manifest import ArraySpec, Manifest
from ..planning import chunk_box
from ..state import decode_value
from .tree import ObjPath, dcp_leaves, fqn_of, obj_path

METADATA_FILE = ".metadata"
DCP_VERSION = "1.0.0"

_METADATA_CLASSES = frozenset({
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
})
_DTYPES = frozenset(name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype))
_PATHS = frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"})


def _allowed(module: str, name: str) -> bool:
    return (
        module == "torch.distributed.checkpoint.metadata" and name in _METADATA_CLASSES
        or module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo"
        or module == "torch" and (name == "Size" or name in _DTYPES)
        or module == "torch.serialization" and name == "_get_layout"
        or module == "pathlib" and name in _PATHS
    )


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise UnsafeCheckpointError(
                f"the DCP metadata asks to load {module}.{name}, which no DCP metadata file needs; refusing to "
                "unpickle it (unpickling runs code). The file is damaged or was made to attack whoever loads it"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("the DCP metadata holds a persistent reference, which no DCP metadata file has")


def load_metadata(data: bytes, where: str = METADATA_FILE) -> Metadata:
    """A DCP ``.metadata`` file's contents, unpickled with the allow-list only."""
    try:
        md = _AllowListUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any damage is the file's, reported as such
        raise FormatError(f"{where} is not a readable DCP metadata file ({type(e).__name__}: {e})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise FormatError(f"{where} does not hold DCP metadata (found {type(md).__name__})")
    return md


# ---------------------------------------------------------------------------------------------
# A ckpt step as DCP sees it


@dataclass(frozen=True, slots=True)
class DcpView:
    """A ckpt step as DCP metadata: ``metadata`` (with ``planner_data``, the object path of
    every key), and for every key the array it reads (``tensors``) or the value it is a leaf
    of (``values``: fqn -> (value path, the leaf))."""

    metadata: Metadata
    tensors: dict[str, str]
    values: dict[str, tuple[str, Any]]
    paths: dict[str, ObjPath]


def grid_boxes(spec: ArraySpec) -> list[Box]:
    """Every chunk of the array's grid: what a reader offers DCP's planner to read from."""
    import itertools

    return [chunk_box(spec, idx) for idx in itertools.product(*(range(g) for g in spec.grid_shape))]


def tensor_metadata(spec: ArraySpec, boxes: Iterable[Box]) -> TensorStorageMetadata:
    dtype = info_by_name(spec.dtype).torch_dtype
    chunks = [ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=torch.Size(b.sizes)) for b in boxes]
    return TensorStorageMetadata(properties=TensorProperties(dtype=dtype), size=torch.Size(spec.shape), chunks=chunks)


def value_leaves(manifest: Manifest, values: dict[str, Any]) -> dict[str, tuple[str, Any, ObjPath]]:
    """fqn -> (value path, leaf, object path) for the DCP leaves of every value (opaque values
    kept as they are: building metadata never unpickles)."""
    out: dict[str, tuple[str, Any, ObjPath]] = {}
    for path, encoded in values.items():
        value = decode_value(encoded, allow_pickle=False, where=path, opaque=True)
        for leaf_path, leaf in dcp_leaves(obj_path(path, manifest.containers), value):
            out[fqn_of(leaf_path)] = (path, leaf, leaf_path)
    return out


def dcp_view(manifest: Manifest, *, boxes: Callable[[ArraySpec], list[Box]] = grid_boxes,
             include: Callable[[str], bool] = lambda _p: True, values: bool = True,
             checkpoint_id: str | None = None) -> DcpView:
    """DCP's view of ``manifest``: each array one key whose chunks are ``boxes(spec)``, each
    value the leaves DCP's traversal makes of it."""
    md: dict[str, Any] = {}
    paths: dict[str, ObjPath] = {}
    tensors: dict[str, str] = {}
    where: dict[str, str] = {}

    def claim(fqn: str, path: str, op: ObjPath) -> None:
        if fqn in where:
            raise LayoutError(f"{where[fqn]!r} and {path!r} both become DCP key {fqn!r}; DCP cannot hold both")
        where[fqn] = path
        paths[fqn] = op

    for path, spec in manifest.arrays.items():
        if not include(path):
            continue
        op = obj_path(path, manifest.containers)
        fqn = fqn_of(op)
        claim(fqn, path, op)
        tensors[fqn] = path
        md[fqn] = tensor_metadata(spec, boxes(spec))
    leaves: dict[str, tuple[str, Any]] = {}
    if values:
        chosen = {p: v for p, v in manifest.values.items() if include(p)}
        for fqn, (path, leaf, op) in value_leaves(manifest, chosen).items():
            claim(fqn, path, op)
            leaves[fqn] = (path, leaf)
            md[fqn] = BytesStorageMetadata()
    meta = Metadata(state_dict_metadata=md, planner_data=dict(paths), version=DCP_VERSION,
                    storage_meta=StorageMeta(checkpoint_id=checkpoint_id, load_id=str(uuid.uuid4())))
    return DcpView(meta, tensors, leaves, paths)
