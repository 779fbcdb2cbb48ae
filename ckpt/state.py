"""Flattening state dicts into paths, and encoding non-tensor values as JSON.

A state dict is a tree of dicts and lists. Its tensor leaves (tensors, DTensors,
:class:`~ckpt.layout.Sharded`) become arrays at ``/``-joined paths (``model/layer.weight``,
``optim/state/layer.weight/exp_avg``). Any subtree that holds no tensor is one JSON value at
its path. Values JSON cannot hold exactly (tuples, bytes, dicts with non-string keys) are
tagged; anything else is pickled only when the caller allows it, on save and on load.

A value that arrived already serialized and that ckpt cannot decode without running code (the
``torch.save`` bytes DCP stores for every non-tensor value, when ``torch.load(weights_only=True)``
refuses them) is kept as an :class:`Opaque` value: stored as it came, decoded only with
``allow_pickle``.

The containers a state's tensors sit in (lists, tuples, dicts with int keys) are recorded by
:func:`container_kinds`, so that :func:`unflatten` rebuilds the tree as it was saved.
"""

from __future__ import annotations

import base64
import io
import math
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import torch

from .errors import LayoutError, UnsupportedValueError
from .layout import Sharded, is_dtensor

_RESERVED = frozenset({"zarr.json"})
_TAG = "__ckpt__"


def is_tensor_leaf(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, Sharded)) or is_dtensor(x)


def _contains_tensor(x: Any) -> bool:
    if is_tensor_leaf(x):
        return True
    if isinstance(x, dict):
        return any(_contains_tensor(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_contains_tensor(v) for v in x)
    return False


def check_component(part: str, where: str) -> str:
    if not part or part in (".", "..") or "/" in part or "\\" in part or "\x00" in part:
        raise LayoutError(f"state key {part!r} at {where or '<root>'} cannot be a storage path component")
    if part.startswith(".") or part.startswith("__") or part in _RESERVED:
        raise LayoutError(
            f"state key {part!r} at {where or '<root>'} is reserved (leading '.' or '__', or "
            f"one of {sorted(_RESERVED)}); rename it"
        )
    return part


def _key(k: Any, where: str) -> str:
    if isinstance(k, bool) or not isinstance(k, (str, int)):
        raise LayoutError(f"state key {k!r} at {where or '<root>'} must be a str or int")
    return check_component(str(k), where)


def flatten(state: Any, prefix: str = "") -> Iterator[tuple[str, Any, bool]]:
    """Yields ``(path, leaf, is_tensor)``; a tensor-free subtree is one leaf."""
    yield from leaves(state, prefix)


def leaves(state: Any, prefix: str = "") -> list[tuple[str, Any, bool]]:
    """:func:`flatten` as a list (built without a generator per level: thousands of leaves per
    state, at every save and restore)."""
    out: list[tuple[str, Any, bool]] = []
    _collect(state, prefix, out)
    return out


def _collect(state: Any, prefix: str, out: list[tuple[str, Any, bool]]) -> None:
    if is_tensor_leaf(state) or not _contains_tensor(state):
        if not prefix:
            raise LayoutError("the state to save must be a dict (or list) of tensors and values")
        out.append((prefix, state, is_tensor_leaf(state)))
        return
    if isinstance(state, dict):
        items: Any = state.items()
        # A dict of plain tensors under names already checked (a model's, its optimizer's
        # moments): its leaves in C loops.
        if type(state) is dict and prefix and _CHECKED_KEYS.issuperset(state) \
                and set(map(type, state.values())) == {torch.Tensor}:
            out.extend(zip(map(f"{prefix}/".__add__, state), state.values(), repeat(True)))
            return
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:  # pragma: no cover - _contains_tensor is False for anything else
        raise LayoutError(f"cannot flatten {type(state).__name__} at {prefix}")
    # Keys of a dict are distinct: only keys made strings (ints) can collide, so only then is
    # every name remembered.
    seen: set[str] | None = None if type(state) is dict and all(type(k) is str for k in state) else set()
    for k, v in items:
        if type(k) is str and k in _CHECKED_KEYS:
            name = k
        else:
            name = _key(k, prefix)
            if type(k) is str and len(_CHECKED_KEYS) < 1 << 16:
                _CHECKED_KEYS.add(k)
        if seen is not None:
            if name in seen:
                raise LayoutError(f"state keys {k!r} collide at {prefix or '<root>'} once made strings")
            seen.add(name)
        path = f"{prefix}/{name}" if prefix else name
        if type(v) is torch.Tensor:  # a plain tensor: a leaf, without a call per leaf
            out.append((path, v, True))
        else:
            _collect(v, path, out)


# Keys that passed check_component: a model's names recur at every save and load (bounded).
_CHECKED_KEYS: set[str] = set()


def container_kinds(state: Any) -> dict[str, Any]:
    """The containers that :func:`flatten` walks into (those holding tensors), by path (``""``
    for the root), where they are not dicts with str keys: ``"list"``, ``"tuple"``, ``"int"``
    (a dict whose keys are all ints) or, for a dict mixing both, the list of its int keys."""
    out: dict[str, Any] = {}

    def visit(x: Any, path: str) -> None:
        if is_tensor_leaf(x) or not _contains_tensor(x):
            return
        if isinstance(x, dict):
            ints = [str(k) for k in x if isinstance(k, int) and not isinstance(k, bool)]
            if ints:
                out[path] = "int" if len(ints) == len(x) else ints
            items: Any = x.items()
        else:
            out[path] = "tuple" if isinstance(x, tuple) else "list"
            items = enumerate(x)
        for k, v in items:
            visit(v, f"{path}/{k}" if path else str(k))

    visit(state, "")
    return out


class _Node(dict):
    """An inner node of a tree being rebuilt (a leaf value may be a dict too)."""


def unflatten(leaves: Mapping[str, Any], containers: Mapping[str, Any] | None = None) -> Any:
    """The tree whose :func:`flatten` gives ``leaves`` (path -> tensor or decoded value), with
    the containers recorded by :func:`container_kinds` (dicts with str keys where none is
    recorded). A list or tuple some of whose elements are left out comes back as a dict with
    int keys."""
    root = _Node()
    for path, value in leaves.items():
        parts = path.split("/")
        node = root
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, _Node())
            if not isinstance(nxt, _Node):
                raise LayoutError(f"{'/'.join(parts[:i + 1])!r} is both a value and a container of {path!r}")
            node = nxt
        if isinstance(node.get(parts[-1]), _Node):
            raise LayoutError(f"{path!r} is both a value and a container")
        node[parts[-1]] = value
    return _shape(root, "", containers or {})


def _shape(node: Any, path: str, containers: Mapping[str, Any]) -> Any:
    if not isinstance(node, _Node):
        return node
    items = {k: _shape(v, f"{path}/{k}" if path else k, containers) for k, v in node.items()}
    kind = containers.get(path)
    if kind in ("list", "tuple"):
        keys = sorted(int(k) for k in items)
        if keys == list(range(len(keys))):
            seq = [items[str(i)] for i in keys]
            return tuple(seq) if kind == "tuple" else seq
        kind = "int"  # elements left out: keep the indices
    if kind == "int":
        return {int(k): v for k, v in items.items()}
    if isinstance(kind, list):
        ints = set(kind)
        return {int(k) if k in ints else k: v for k, v in items.items()}
    return dict(items)


def set_leaf(state: Any, path: str, value: Any) -> None:
    """Replace the leaf at ``path`` in place (for non-tensor values on load)."""
    parts = path.split("/")
    node = state
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[_lookup(node, p)]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[_lookup(node, last)] = value
    else:
        raise LayoutError(f"cannot set {path}: its container is a {type(node).__name__}, not a dict or list")


def _lookup(d: dict, name: str) -> Any:
    if name in d:
        return name
    for k in d:
        if str(k) == name:
            return k
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True, slots=True)
class Opaque:
    """A value kept as the bytes it came in, because decoding it would run code from the
    checkpoint: ``kind`` ``"torch"`` (``torch.save`` bytes, as DCP stores non-tensor values)
    or ``"pickle"``. Stored tagged; decoded only with ``allow_pickle``."""

    data: bytes
    kind: str = "torch"

    def decode(self) -> Any:
        """The value (runs code from the bytes: only for a caller who allowed pickle)."""
        if self.kind == "pickle":
            return pickle.loads(self.data)  # noqa: S301 - the caller opted in
        import torch

        return torch.load(io.BytesIO(self.data), weights_only=False)  # noqa: S614 - the caller opted in


def encode_value(v: Any, *, allow_pickle: bool, where: str) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        if math.isfinite(v):
            return v
        return {_TAG: "float", "v": repr(v)}
    if isinstance(v, list):
        return [encode_value(x, allow_pickle=allow_pickle, where=f"{where}/{i}") for i, x in enumerate(v)]
    if type(v) is tuple:
        return {_TAG: "tuple", "v": [encode_value(x, allow_pickle=allow_pickle, where=where) for x in v]}
    if type(v) is dict:
        if all(isinstance(k, str) for k in v) and _TAG not in v:
            return {k: encode_value(x, allow_pickle=allow_pickle, where=f"{where}/{k}") for k, x in v.items()}
        if all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in v):
            return {
                _TAG: "dict",
                "v": [[k, encode_value(x, allow_pickle=allow_pickle, where=where)] for k, x in v.items()],
            }
    if isinstance(v, (bytes, bytearray)):
        return {_TAG: "bytes", "v": base64.b64encode(bytes(v)).decode()}
    if isinstance(v, Opaque):
        return {_TAG: v.kind, "v": base64.b64encode(v.data).decode()}
    if allow_pickle:
        try:
            data = pickle.dumps(v, protocol=4)
        except Exception as e:
            raise UnsupportedValueError(f"value at {where!r} cannot be pickled: {e}") from e
        return {_TAG: "pickle", "v": base64.b64encode(data).decode()}
    raise UnsupportedValueError(
        f"value at {where!r} of type {type(v).__name__} cannot be stored as JSON; convert it, "
        "or pass allow_pickle=True to save (and to load) to pickle it"
    )


def decode_value(j: Any, *, allow_pickle: bool, where: str, opaque: bool = False) -> Any:
    """The value ``j`` encodes. A pickled or ``torch.save``'d value is decoded only with
    ``allow_pickle``; with ``opaque`` it comes back as an :class:`Opaque` instead, undecoded."""
    def sub(x: Any, at: str) -> Any:
        return decode_value(x, allow_pickle=allow_pickle, where=at, opaque=opaque)

    if isinstance(j, list):
        return [sub(x, where) for x in j]
    if not isinstance(j, dict):
        return j
    tag = j.get(_TAG)
    if tag is None:
        return {k: sub(x, f"{where}/{k}") for k, x in j.items()}
    v = j.get("v")
    if tag == "float":
        return float(v)
    if tag == "tuple":
        return tuple(sub(x, where) for x in v)
    if tag == "dict":
        return {k: sub(x, where) for k, x in v}
    if tag == "bytes":
        return base64.b64decode(v)
    if tag in ("pickle", "torch"):
        value = Opaque(base64.b64decode(v), tag)
        if opaque:
            return value
        if not allow_pickle:
            how = "pickled" if tag == "pickle" else "stored by torch.save and not readable with weights_only=True"
            raise UnsupportedValueError(
                f"value at {where!r} is {how}; loading it runs code from the checkpoint. Pass "
                "allow_pickle=True to load only if you trust where the checkpoint came from"
            )
        return value.decode()
    raise UnsupportedValueError(f"value at {where!r} has an unknown tag {tag!r}; upgrade ckpt to read it")
