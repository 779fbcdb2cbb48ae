"""A restore in one pass: every tensor of the state read straight from memory that holds it whole.

The restore after a failure is mostly the same case: a data-parallel rank (or a process of a
job that never changed its layout) loads the step it just saved, every tensor a plain CPU
tensor of the shape and dtype it was saved with, stored as one chunk, and the node agent still
holds every one of those chunks in its shared memory. The planned load (:func:`ckpt.io.load_step`)
builds a manifest of typed array declarations, a load plan of read requests, a locator and a
batch of pending reads for it: a few microseconds per array in each of those layers, and at
thousands of arrays (an LLM's parameters and optimizer state) those layers cost ten times the
copies themselves.

:func:`load_direct` does that case in one pass over the commit point's JSON and the state: the
commit point is parsed and its seal checked as always; each tensor is matched against its array
declaration (path, dtype, shape, one chunk); every chunk is read with the memory tier's
``read_whole`` (a few ``preadv`` per segment) into the tensor itself, and checked against the
crc32c stored with it. The moment
anything is not this case (another layout, a DTensor, a tensor on a GPU, a chunk not held in
memory, a value that differs between writers, a missing or extra entry, a checksum that does
not match) it returns ``None`` having changed nothing but tensors the planned load then
overwrites, and the planned load does the restore, with its checks and its error messages.
"""

from __future__ import annotations

from typing import Any

import torch

from . import format as fmt
from .dtypes import name_of
from .manifest import FORMAT_VERSION, MANIFEST_KEY
from .reading import _bytes_of
from .restore import RestoreSource
from .state import decode_value, flatten, set_leaf


def load_direct(source: RestoreSource, state_dict: Any, step: int, *, strict: bool = True,
                allow_pickle: bool = False) -> int | None:
    """Load committed ``step`` into ``state_dict`` in one pass if every tensor is held whole in
    ``source``'s memory (see the module); the bytes read, or None (then use the planned load)."""
    sdir = fmt.step_dir(step)
    if not source.holds_step(step):
        return None
    path = f"{sdir}/{fmt.META}"
    try:
        doc = fmt.parse_root(source.read(path), path, zarr_metadata=False)
    except FileNotFoundError:
        return None
    attributes = doc.get("attributes")
    manifest = attributes.get(MANIFEST_KEY) if type(attributes) is dict else None
    # The commit points of formats 3 and 4 are alike (4 changed the fragments only)
    if (type(manifest) is not dict or manifest.get("format") != "ckpt" or manifest.get("format_version") not in (3, FORMAT_VERSION)
            or manifest.get("step") != step or manifest.get("varying_values") or manifest.get("values_by_writer")
            or type(manifest.get("arrays")) is not list or type(values := manifest.get("values")) is not dict):
        return None
    arrays: dict[str, dict] = {}
    for a in manifest["arrays"]:
        if type(a) is not dict or type(p := a.get("path")) is not str or p in arrays:
            return None
        arrays[p] = a
    items: list[tuple[str, memoryview]] = []
    found_values: dict[str, Any] = {}
    origin: dict[tuple[int, str], str] = {}  # (dimensions, separator) -> the key's tail of the chunk at the origin: "c/0/0"
    names: dict[torch.dtype, str] = {}
    for leaf_path, leaf, is_tensor in flatten(state_dict):
        if not is_tensor:
            if leaf_path in values:
                found_values[leaf_path] = values[leaf_path]
            elif strict or leaf_path in arrays:
                return None
            continue
        a = arrays.get(leaf_path)
        if a is None:
            if strict or leaf_path in values:
                return None
            continue
        if type(leaf) is not torch.Tensor or not leaf.is_cpu or not leaf.is_contiguous():
            return None
        shape = list(leaf.shape)  # the whole array in one chunk (however it was saved: plain, replicated)
        dtype = leaf.dtype
        name = names.get(dtype) or names.setdefault(dtype, name_of(dtype))
        if a.get("shape") != shape or a.get("chunk_shape") != shape or 0 in shape or a.get("dtype") != name:
            return None
        tail = origin.get((len(shape), separator := a.get("chunk_separator", "/")))
        if tail is None:
            if separator != "/" and separator != ".":
                return None
            tail = origin[(len(shape), separator)] = fmt.chunk_key("", [0] * len(shape), separator)
        items.append((f"{sdir}/{leaf_path}{tail}", _bytes_of(leaf)))
    if strict and (len(items) != len(arrays) or len(found_values) != len(values)):
        return None
    nbytes = source.read_whole(items)
    if nbytes is None:
        return None  # not held whole, or a checksum differs: the planned load reads (and says why)
    for leaf_path, encoded in found_values.items():
        set_leaf(state_dict, leaf_path, decode_value(encoded, allow_pickle=allow_pickle, where=leaf_path))
    return nbytes

