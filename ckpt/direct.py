"""A restore in one pass: every tensor of the state read straight from memory that holds it whole.

The restore after a failure is mostly the same case: a data-parallel rank (or a process of a
job that never changed its layout) loads the step it just saved, every tensor a plain CPU
tensor of the shape and dtype it was saved with, stored as one chunk, and the node agent still
holds every one of those chunks in its shared memory. The planned load (:func:`ckpt.io.load_step`)
builds a manifest of typed array declarations, a load plan of read requests, a locator and a
batch of pending reads for it: a few microseconds per array in each of those layers, and at
thousands of arrays (an LLM's parameters and optimizer state) those layers cost ten times the
copies themselves.

:func:`load_direct` does that case in one pass over the commit point and the state. The commit
point's seal is checked on its bytes as always. Its array declarations are then not parsed: the
declarations the state implies (each tensor's path, shape and dtype, sorted by path, with the
layout of the commit point's first declaration) are written out as our writer writes them and
compared with the commit point's as text. Equal text is equal declarations, every tensor
declared as it is held and nothing else declared; the rest of the document is parsed with a
stand-in in their place. (Parsing 2,000 declarations and matching each tensor against its own
took most of a rank's restore.) Any other commit point is parsed and matched tensor by tensor.
Every chunk is then read with the memory tier's ``read_whole`` into the tensor itself and
checked against the crc32c stored with it.

A memory tier that holds the step whole may answer :meth:`RestoreSource.held_step` with its
own table of it (the node agent builds one per step for all its ranks: ``agent.trainer.table``):
the paths, shapes and dtypes are then compared with the state's as lists, the commit point is
neither read nor compared here (the table was built from it, its seal checked), and ``fill``
copies and checks every chunk.

The moment anything is not this case (another layout, a DTensor, a tensor on a GPU, a chunk
not held in memory, a value that differs between writers, a missing or extra entry, a checksum
that does not match) it returns ``None`` having changed nothing but tensors the planned load
then overwrites, and the planned load does the restore, with its checks and its error messages.
"""

from __future__ import annotations

import re
from operator import add, attrgetter, itemgetter
from typing import Any

import torch

from . import format as fmt
from .dtypes import name_of
from .jsondocs import loads_around
from .manifest import FORMAT_VERSION, MANIFEST_KEY
from .restore import HeldStep, RestoreSource
from .state import decode_value, set_leaf
from .state import leaves as flat_leaves

Leaves = list[tuple[str, torch.Tensor]]
_shape, _dtype, _is_cpu = attrgetter("shape"), attrgetter("dtype"), attrgetter("is_cpu")

# How a commit point of format 3 or 4 begins, up to its array declarations (ckpt.commit writes
# its keys in this order); anything else is parsed whole.
_HEAD = re.compile(rb'\{"zarr_format":3,"node_type":"group","attributes":\{"' + MANIFEST_KEY.encode()
                   + rb'":\{"format":"ckpt","format_version":[34],"step":\d{1,20},"save_id":"[A-Za-z0-9._-]{1,200}",'
                   rb'"created_at":[-+.0-9eE]{1,40},"library_versions":\{[^{}]{0,4096}\},"writers":\{[^{}]{0,4096}\},'
                   rb'"arrays":()\[\{"path":"[ -!#-\[\]-~]{1,4096}","shape":\[[0-9,]{0,200}\],"dtype":"[a-z0-9_]{1,40}",'
                   rb'"chunk_shape":\[[0-9,]{0,200}\],"layout":(\{[^{}]{0,4096}\})(,"chunk_separator":"\.")?\}')


def _declarations(data: bytes, leaves: Leaves, prefix: str) -> tuple[dict, list[tuple[str, torch.Tensor]]] | None:
    """The manifest and the chunk key (after ``prefix``) of every tensor, if the commit point
    ``data`` declares exactly ``leaves`` as whole arrays held in one chunk (compared as text, see
    the module); None: match them one by one."""
    m = _HEAD.match(data)
    seal = fmt.root_seal(data) if m is not None else None
    if seal is None or not leaves:  # (a commit point that declares no array is parsed)
        return None
    paths = "".join([p for p, _ in leaves])
    if not (paths.isascii() and paths.isprintable()) or '"' in paths or "\\" in paths:
        return None  # a path JSON writes escaped
    tail = m.group(2).decode() + ("}" if m.group(3) is None else ',"chunk_separator":"."}')
    separator = "." if m.group(3) else "/"
    # Thousands of tensors: column by column, in C loops; the texts once per (shape, dtype).
    paths, tensors = zip(*leaves)
    kinds = list(zip(map(_shape, tensors), map(_dtype, tensors)))
    texts: dict[tuple[torch.Size, torch.dtype], tuple[str, str]] = {}  # -> (declaration's tail, chunk key's tail)
    for shape, dtype in set(kinds):
        if 0 in shape:
            return None
        dims = "[" + ",".join(map(str, shape)) + "]"
        texts[(shape, dtype)] = (f'","shape":{dims},"dtype":"{name_of(dtype)}","chunk_shape":{dims},"layout":{tail}',
                                 fmt.chunk_key("", [0] * len(shape), separator))
    paths, kinds, tensors = zip(*sorted(zip(paths, kinds, tensors), key=itemgetter(0)))  # (paths are distinct)
    declared, key_tails = zip(*map(texts.__getitem__, kinds))
    start = m.start(1)  # of the declarations' list
    expected = ("[" + ",".join(map(add, map('{"path":"'.__add__, paths), declared)) + "]").encode()
    end = start + len(expected)
    if not data.startswith(expected, start):
        return None
    # The rest is parsed (the writer runs too: this restore does not need them, but a document
    # any reader refuses must not be restored from either)
    _at, digits_end, stored, consolidated = seal
    parsed = loads_around([data[:start], data[end:digits_end] + b"}}" if consolidated else data[end:]])
    if parsed is None:
        return None
    doc, stand_in = parsed
    attributes = doc.get("attributes") if type(doc) is dict else None
    manifest = attributes.get(MANIFEST_KEY) if type(attributes) is dict else None
    if type(manifest) is not dict or manifest.get("arrays") != stand_in or attributes.get(fmt.SEAL_KEY) != stored:
        return None
    return manifest, list(zip(map(add, map(prefix.__add__, paths), key_tails), tensors))


def _matched(manifest: dict, leaves: Leaves, strict: bool, prefix: str,
             ) -> tuple[list[tuple[str, torch.Tensor]], set[str]] | None:
    """The chunk key (after ``prefix``) of every tensor the manifest declares as a whole array of
    one chunk, as the tensor is held (tensor by tensor), and the paths declared; None if one is not."""
    if type(manifest.get("arrays")) is not list:
        return None
    arrays: dict[str, dict] = {}
    for a in manifest["arrays"]:
        if type(a) is not dict or type(p := a.get("path")) is not str or p in arrays:
            return None
        arrays[p] = a
    keyed = []
    origin: dict[tuple[int, str], str] = {}  # (dimensions, separator) -> the key's tail of the chunk at the origin: "c/0/0"
    names: dict[torch.dtype, str] = {}
    for path, leaf in leaves:
        a = arrays.get(path)
        if a is None:
            if strict:
                return None
            continue
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
        keyed.append((f"{prefix}{path}{tail}", leaf))
    if strict and len(keyed) != len(arrays):
        return None
    return keyed, set(arrays)


def _values(manifest: dict, step: int, others: list[str], strict: bool, arrays: set[str]) -> dict[str, Any] | None:
    """The encoded value of each non-tensor leaf ``others`` from a manifest of the direct case
    (values the same on every writer), or None: a manifest or leaves the planned load handles."""
    # The commit points of formats 3 and 4 are alike (4 changed the fragments only)
    if (manifest.get("format") != "ckpt" or manifest.get("format_version") not in (3, FORMAT_VERSION)
            or manifest.get("step") != step or manifest.get("varying_values") or manifest.get("values_by_writer")
            or type(values := manifest.get("values")) is not dict):
        return None
    found: dict[str, Any] = {}
    for leaf_path in others:
        if leaf_path in values:
            found[leaf_path] = values[leaf_path]
        elif strict or leaf_path in arrays:
            return None
    if strict and len(found) != len(values):
        return None
    return found


def _from_held(held: HeldStep, paths: tuple[str, ...], tensors: tuple[torch.Tensor, ...], others: list[str],
               step: int, strict: bool) -> tuple[int, dict[str, Any]] | None:
    """Fill the tensors from a step a memory tier holds whole if it declares exactly them, as
    they are held; the bytes read and the values of ``others``, or None."""
    by_path = dict(zip(paths, tensors))
    if len(by_path) != len(held.paths):
        return None
    try:
        tensors = tuple(map(by_path.__getitem__, held.paths))  # in the table's order
    except KeyError:
        return None
    if list(map(_shape, tensors)) != held.shapes or list(map(_dtype, tensors)) != held.dtypes:
        return None
    found = _values(held.manifest, step, others, strict, set(held.paths) if others and not strict else set())
    if found is None:
        return None
    nbytes = held.fill(tensors)
    return None if nbytes is None else (nbytes, found)


def load_direct(source: RestoreSource, state_dict: Any, step: int, *, strict: bool = True,
                allow_pickle: bool = False) -> int | None:
    """Load committed ``step`` into ``state_dict`` in one pass if every tensor is held whole in
    ``source``'s memory (see the module); the bytes read, or None (then use the planned load).
    A tier that holds the step whole answers with one table of it (:meth:`RestoreSource.held_step`);
    else the commit point's declarations are compared with the state's."""
    flat = flat_leaves(state_dict)  # thousands of leaves: checked column by column, in C loops
    paths, objects, is_tensor = zip(*flat) if flat else ((), (), ())
    others: list[str] = []
    if not all(is_tensor):
        others = [p for p, _, t in flat if not t]
        rows = [(p, o) for p, o, t in flat if t]
        paths, objects = zip(*rows) if rows else ((), ())
    if set(map(type, objects)) - {torch.Tensor} or not all(map(_is_cpu, objects)) \
            or not all(map(torch.Tensor.is_contiguous, objects)):
        return None
    held = source.held_step(step)
    got = _from_held(held, paths, objects, others, step, strict) if held is not None else None
    if got is None:
        got = _from_commit_point(source, list(zip(paths, objects)), others, step, strict)
    if got is None:
        return None  # not held whole, or a checksum differs: the planned load reads (and says why)
    nbytes, found_values = got
    for leaf_path, encoded in found_values.items():
        set_leaf(state_dict, leaf_path, decode_value(encoded, allow_pickle=allow_pickle, where=leaf_path))
    return nbytes


def _from_commit_point(source: RestoreSource, leaves: Leaves, others: list[str], step: int,
                       strict: bool) -> tuple[int, dict[str, Any]] | None:
    """Fill the tensors from chunks held whole, matched against the commit point's declarations
    (as text, else one by one); the bytes read and the values of ``others``, or None."""
    sdir = fmt.step_dir(step)
    if not source.holds_step(step):
        return None
    path = f"{sdir}/{fmt.META}"
    try:
        data = source.read(path)
    except FileNotFoundError:
        return None
    declared = _declarations(data, leaves, f"{sdir}/")
    if declared is not None:
        manifest, keyed = declared
        arrays: set[str] = set()  # those of the state's tensors: no other leaf's path
    else:
        doc = fmt.parse_root(data, path, zarr_metadata=False)
        attributes = doc.get("attributes")
        manifest = attributes.get(MANIFEST_KEY) if type(attributes) is dict else None
        if type(manifest) is not dict or (matched := _matched(manifest, leaves, strict, f"{sdir}/")) is None:
            return None
        keyed, arrays = matched
    found = _values(manifest, step, others, strict, arrays)
    if found is None:
        return None
    nbytes = source.read_whole(keyed)
    return None if nbytes is None else (nbytes, found)
