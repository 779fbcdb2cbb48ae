"""``ckpt import hf``: a ``save_pretrained`` folder (one ``model.safetensors``, or shards named
by ``model.safetensors.index.json``) becomes a committed step whose arrays are
``<prefix><name>`` (``model/`` by default), so that
``ckpt.load({"model": model.state_dict()}, run)`` fills the model, and any layout (FSDP2,
TP, ...) can start from it.

Every header is read and checked against its file before a byte is written (a truncated file,
an index naming a missing shard, a tensor in two files are refused). Each tensor is one array
whose chunks split it along its leading dimensions, so every chunk is a contiguous byte range
of the file: tensors are streamed in blocks of at most ``buffer_bytes`` through
``ckpt.ingest.write_step``. Weights ``save_pretrained`` wrote once because the model ties them
(``lm_head.weight`` to the input embedding, per its ``config.json``) are written under every
name ``model.state_dict()`` has (``restore_tied=False`` keeps only what the folder holds). The
config is kept in the step's user metadata (``hf.config``), where ``ckpt export --format hf``
finds it. A failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from ..dtypes import info_of
from ..errors import CheckpointNotFoundError, FormatError
from ..format import CHUNK_SEPARATOR
from ..ingest import DEFAULT_BUFFER_BYTES, SourcePiece, write_step
from ..layout import Box
from ..manifest import ArraySpec, Manifest
from ..plan import DEFAULT_MAX_CHUNK_BYTES
from ..planning import chunk_shape_for
from ..state import check_component
from ..storage import RetryPolicy, Storage, open_storage
from .safetensors import StTensor, read_box, read_header
from .tied import tied_pairs

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"


def source_files(source: Storage) -> list[str]:
    """The safetensors files of a ``save_pretrained`` folder, checked to exist."""
    try:
        index = json.loads(source.read(INDEX))
    except FileNotFoundError:
        if source.exists(SINGLE):
            return [SINGLE]
        others = sorted(n for n in source.list_dir("") if n.endswith((".bin", ".pt", ".pth", ".safetensors")))
        hint = f" (found {', '.join(others[:3])}: only safetensors weights are imported)" if others else ""
        raise CheckpointNotFoundError(f"{source.url} is not a Hugging Face checkpoint folder: it has neither {SINGLE} "
                                      f"nor {INDEX}{hint}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{source.url}/{INDEX} is not JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError(f"{source.url}/{INDEX} has no weight_map of tensor name -> file")
    files = sorted(set(weight_map.values()))
    for f in files:
        if "/" in f or f in ("", ".", "..") or not source.exists(f):
            raise FormatError(f"{source.url}/{INDEX} names the shard {f!r}, which is not in the folder")
    return files


def read_config(source: Storage) -> dict[str, Any] | None:
    try:
        cfg = json.loads(source.read(CONFIG))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{source.url}/{CONFIG} is not JSON ({e})") from None
    return cfg if isinstance(cfg, dict) else None


def import_hf(
    src: str | os.PathLike[str] | Storage,
    run: str | os.PathLike[str] | Storage,
    step: int,
    *,
    prefix: str = "model/",
    restore_tied: bool = True,
    layout: str = "shards",
    overwrite: bool = False,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    threads: int = 8,
    storage_options: dict[str, Any] | None = None,
    retry: RetryPolicy | None = None,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Manifest:
    """Import the ``save_pretrained`` folder ``src`` as committed step ``step`` of ``run``."""
    source = open_storage(src, storage_options=storage_options, retry=retry)
    dest = open_storage(run, storage_options=storage_options, retry=retry)
    tensors: dict[str, StTensor] = {}
    for f in source_files(source):
        for t in read_header(source, f)[0]:
            if t.name in tensors:
                raise FormatError(f"{source.url}: tensor {t.name!r} is in both {tensors[t.name].file} and {f}")
            tensors[t.name] = t
    config = read_config(source)
    restored: dict[str, str] = {}
    if restore_tied:
        restored = {tgt: src_name for tgt, src_name in tied_pairs(config).items()
                    if src_name in tensors and tgt not in tensors}
    arrays: dict[str, ArraySpec] = {}
    pieces: list[SourcePiece] = []
    for name in sorted([*tensors, *restored]):
        t = tensors[restored.get(name, name)]
        path = prefix + name
        for part in path.split("/"):
            check_component(part, path)
        info = info_of(t.dtype)
        chunk = chunk_shape_for(t.shape, (0,) * len(t.shape), info.itemsize, max_chunk_bytes)
        layout_doc: dict[str, Any] = {"kind": "imported", "from": "hf"}
        if name in restored:
            layout_doc["tied_to"] = prefix + restored[name]
        arrays[path] = ArraySpec(path=path, shape=t.shape, dtype=info.name, chunk_shape=chunk, layout=layout_doc,
                                 chunk_separator=CHUNK_SEPARATOR)
        if t.shape and 0 in t.shape:
            continue
        pieces.append(SourcePiece(path, Box((0,) * len(t.shape), t.shape), lambda box, t=t: read_box(source, t, box)))
    if on_start is not None:
        on_start(sum(tensors[restored.get(n, n)].end - tensors[restored.get(n, n)].start
                     for n in [*tensors, *restored]))
    user: dict[str, Any] = {"ckpt.import": {"format": "hf", "source": source.url, "prefix": prefix,
                                            "restored_tied": sorted(restored)}}
    if config is not None:
        user["hf"] = {"config": config}
    return write_step(dest, step, arrays, pieces, user_metadata=user, layout=layout, overwrite=overwrite,
                      buffer_bytes=buffer_bytes, threads=threads, progress=progress)
