"""``ckpt export --format dcp``: a committed step as a DCP checkpoint folder that stock
``dcp.load`` (``FileSystemReader``) reads bit for bit.

The folder is what ``FileSystemWriter`` writes for one rank: ``__0_0.distcp`` holding every
item as a ``torch.save`` blob, and ``.metadata``, DCP's pickled ``Metadata`` (written by
pickling DCP's own classes). Each tensor becomes one key whose chunks are row-major blocks of
at most ``buffer_bytes``, each read from the step (every chunk checked) and written as it is
read: memory stays one block. Values become the leaves DCP's traversal makes of them, each as
``torch.save`` bytes; a value kept opaque is written as the bytes it was stored as (nothing is
unpickled here; DCP unpickles on load, as it would have). The folder is written beside its
final name and renamed into place: a failed export leaves nothing.
"""

from __future__ import annotations

import os
import pickle
import shutil
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex

from .. import format as fmt
from ..dtypes import info_by_name
from ..export import DEFAULT_BUFFER_BYTES, _matches
from ..layout import Box
from ..layouts import ChunkLayout, Locator
from ..manifest import ArraySpec, Manifest
from ..regions import read_region, row_major_blocks
from ..state import Opaque
from ..storage import Storage
from .metadata import METADATA_FILE, dcp_view
from .tree import leaf_bytes

DATA_FILE = "__0_0.distcp"


def prepare_out_dir(out: str, overwrite: bool) -> tuple[str, str]:
    """(final path, temp path beside it) for a folder output; refuses an existing one unless
    ``overwrite``."""
    if "://" in out and not out.startswith("file://"):
        raise ValueError(f"OUT {out!r}: a folder export writes to a local path; copy the folder afterwards")
    path = os.path.abspath(os.path.expanduser(out.removeprefix("file://")))
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"the directory of OUT {out!r} does not exist; create it first")
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"OUT {out!r} is a file; give a folder")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{out!r} exists and is not empty; pass --overwrite to replace it")
    return path, os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")


def publish_dir(tmp: str, path: str) -> None:
    """Put the finished folder ``tmp`` in place of ``path`` (an old one is removed after)."""
    old = None
    if os.path.exists(path):
        old = f"{tmp}.old"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_dcp(
    storage: Storage,
    step: int,
    out: str,
    *,
    include: Sequence[str] = (),
    values: bool = True,
    allow_pickle: bool = False,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    threads: int = 8,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    manifest: Manifest | None = None,
) -> dict[str, Any]:
    """Write committed step ``step`` as the DCP checkpoint folder ``out`` (a local path)."""
    if buffer_bytes < 1 or threads < 1:
        raise ValueError("buffer_bytes and threads must be >= 1")
    manifest = manifest or fmt.read_manifest(storage, step)
    path, tmp = prepare_out_dir(out, overwrite)

    def blocks(spec: ArraySpec) -> list:
        return list(row_major_blocks(spec, info_by_name(spec.dtype).itemsize, buffer_bytes))

    view = dcp_view(manifest, boxes=blocks, include=lambda p: _matches(p, include), values=values,
                    checkpoint_id=path)
    if include and not view.tensors and not view.values:
        raise ValueError(f"nothing of step {step} matches --include {' '.join(include)}; `ckpt inspect` lists the paths")
    locator = Locator(storage, step, ChunkLayout.of(manifest), manifest.arrays)
    records: dict[MetadataIndex, _StorageInfo] = {}
    nbytes = 0
    os.makedirs(tmp)
    try:
        with open(os.path.join(tmp, DATA_FILE), "wb") as f:
            for fqn, (vpath, leaf) in view.values.items():
                data = leaf.data if isinstance(leaf, Opaque) and leaf.kind == "torch" else leaf_bytes(
                    leaf, allow_pickle=allow_pickle, where=vpath)
                records[MetadataIndex(fqn)] = _StorageInfo(DATA_FILE, f.tell(), len(data))
                f.write(data)
            for fqn, apath in view.tensors.items():
                spec = manifest.arrays[apath]
                dtype = info_by_name(spec.dtype).torch_dtype
                for chunk in view.metadata.state_dict_metadata[fqn].chunks:
                    box = Box(tuple(chunk.offsets), tuple(chunk.sizes))
                    buf = torch.empty(box.sizes, dtype=dtype)
                    read_region(storage, locator, spec, box, buf, threads=threads)
                    start = f.tell()
                    torch.save(buf, f)
                    records[MetadataIndex(fqn, box.offsets)] = _StorageInfo(DATA_FILE, start, f.tell() - start)
                    nbytes += buf.numel() * buf.element_size()
                    if progress is not None:
                        progress(buf.numel() * buf.element_size())
            f.flush()
            os.fsync(f.fileno())
        meta = view.metadata
        meta.storage_data = records
        with open(os.path.join(tmp, METADATA_FILE), "wb") as f:
            pickle.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        publish_dir(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return {"out": path, "format": "dcp", "tensors": len(view.tensors), "values": len(view.values), "bytes": nbytes,
            "files": [METADATA_FILE, DATA_FILE]}
