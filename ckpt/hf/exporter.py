"""``ckpt export --format hf``: a committed step as a Hugging Face folder that ``from_pretrained``
reads: ``model.safetensors`` when everything fits one shard, else
``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``.

By default the tensors under ``model/`` are exported without that prefix (the layout of
``{"model": model.state_dict()}`` and of ``ckpt import hf``). Tensors go into shards in path
order, a new shard when the next tensor would pass ``max_shard_bytes`` (a larger tensor gets a
shard of its own), as ``save_pretrained`` splits. Each file is streamed: its header from the
manifest, then each tensor's bytes in row-major blocks of at most ``buffer_bytes`` (memory stays
one block). Tied weights are written once, as transformers expects: when the model's
``config.json`` (``--config``, the one in OUT_DIR, or the one an HF import kept) declares a
tie, the target (``lm_head.weight``) is left out if its bytes equal the source's (checked);
``from_pretrained`` ties it again. The files are written into a temp folder and moved into
OUT_DIR at the end: a failed export leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import format as fmt
from ..dtypes import info_by_name
from ..export import DEFAULT_BUFFER_BYTES, ExportItem, safetensors_header, select, write_safetensors_data
from ..layouts import ChunkLayout, Locator
from ..manifest import Manifest
from ..regions import read_region, row_major_blocks
from ..storage import Storage
from .importer import CONFIG, INDEX, SINGLE
from .tied import tied_pairs

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # the Hub's usual shard size


def shard_items(items: Sequence[ExportItem], max_shard_bytes: int) -> list[list[ExportItem]]:
    """Greedy, in order: a new shard when the next tensor would pass the limit."""
    shards: list[list[ExportItem]] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def same_bytes(storage: Storage, locator: Locator, a: ExportItem, b: ExportItem, threads: int, budget: int) -> bool:
    """Whether two arrays hold the same bytes (read block by block, the same boxes of each)."""
    if (a.spec.shape, a.spec.dtype) != (b.spec.shape, b.spec.dtype):
        return False
    dtype = info_by_name(a.spec.dtype).torch_dtype
    for box in row_major_blocks(a.spec, dtype.itemsize, budget):
        x, y = torch.empty(box.sizes, dtype=dtype), torch.empty(box.sizes, dtype=dtype)
        read_region(storage, locator, a.spec, box, x, threads=threads)
        read_region(storage, locator, b.spec, box, y, threads=threads)
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False
    return True


def find_config(config: str | None, out: str, manifest: Manifest) -> tuple[dict[str, Any] | None, bool]:
    """The model's config, and whether it must be written into OUT_DIR."""
    if config is not None:
        with open(config) as f:
            return json.load(f), True
    beside = os.path.join(out, CONFIG)
    if os.path.isfile(beside):
        with open(beside) as f:
            return json.load(f), False
    kept = manifest.user_metadata.get("hf")
    if isinstance(kept, dict) and isinstance(kept.get("config"), dict):
        return kept["config"], True
    return None, False


def export_hf(
    storage: Storage,
    step: int,
    out: str,
    *,
    include: Sequence[str] = (),
    strip_prefix: str = "model/",
    cast: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    config: str | None = None,
    overwrite: bool = False,
    threads: int = 8,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    progress: Callable[[int], None] | None = None,
    manifest: Manifest | None = None,
) -> dict[str, Any]:
    """Write committed step ``step`` into the folder ``out`` (local) in Hugging Face's layout."""
    if max_shard_bytes < 1 or buffer_bytes < 1 or threads < 1:
        raise ValueError("max_shard_bytes, buffer_bytes and threads must be >= 1")
    if "://" in out and not out.startswith("file://"):
        raise ValueError(f"OUT_DIR {out!r}: a folder export writes to a local path; copy the folder afterwards")
    out = os.path.abspath(os.path.expanduser(out.removeprefix("file://")))
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"OUT_DIR {out!r} is a file; give a folder")
    if not os.path.isdir(os.path.dirname(out)):
        raise FileNotFoundError(f"the directory of OUT_DIR {out!r} does not exist; create it first")
    existing = [n for n in (os.listdir(out) if os.path.isdir(out) else [])
                if n in (SINGLE, INDEX) or n.startswith("model-") and n.endswith(".safetensors")]
    if existing and not overwrite:
        raise FileExistsError(f"{out!r} already holds {existing[0]}; pass --overwrite to replace the weights")
    manifest = manifest or fmt.read_manifest(storage, step)
    items = select(manifest, include=include or ([strip_prefix + "*"] if strip_prefix else []),
                   strip_prefix=strip_prefix, cast=cast)
    cfg, write_config = find_config(config, out, manifest)
    locator = Locator(storage, step, ChunkLayout.of(manifest), manifest.arrays)
    by_key = {it.key: it for it in items}
    dropped = sorted(t for t, s in tied_pairs(cfg).items() if t in by_key and s in by_key
                     and same_bytes(storage, locator, by_key[t], by_key[s], threads, buffer_bytes))
    items = [it for it in items if it.key not in set(dropped)]
    shards = shard_items(items, max_shard_bytes)
    names = shard_names(len(shards))
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{uuid.uuid4().hex}.tmp")
    os.makedirs(tmp)
    try:
        for name, shard in zip(names, shards):
            _write_file(storage, locator, os.path.join(tmp, name), shard, threads, buffer_bytes, progress)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(it.nbytes for it in items)},
                     "weight_map": {it.key: n for n, shard in zip(names, shards) for it in shard}}
            index["weight_map"] = dict(sorted(index["weight_map"].items()))
            with open(os.path.join(tmp, INDEX), "w") as f:
                json.dump(index, f, indent=2)
        if write_config and cfg is not None:
            with open(os.path.join(tmp, CONFIG), "w") as f:
                json.dump(cfg, f, indent=2)
        os.makedirs(out, exist_ok=True)
        for n in existing:
            os.remove(os.path.join(out, n))
        for n in os.listdir(tmp):
            os.replace(os.path.join(tmp, n), os.path.join(out, n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": out, "format": "hf", "tensors": len(items), "bytes": sum(it.nbytes for it in items),
            "files": names + ([INDEX] if len(shards) > 1 else []), "tied_left_out": dropped,
            "config": bool(cfg)}


def _write_file(storage: Storage, locator: Locator, path: str, items: list[ExportItem], threads: int,
                buffer_bytes: int, progress: Callable[[int], None] | None) -> None:
    header, ordered = safetensors_header(items, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(header)
        write_safetensors_data(f, storage, locator, ordered, threads=threads, buffer_bytes=buffer_bytes,
                               progress=progress)
        f.flush()
        os.fsync(f.fileno())
