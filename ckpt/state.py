"""Flattening state dicts into paths, and encoding non-tensor values as JSON.

A state dict is a tree of dicts and lists. Its tensor leaves (tensors, DTensors,
:class:`~ckpt.layout.Sharded`) become arrays at ``/``-joined paths (``model/layer.weight``,
``optim/state/layer.weight/exp_avg``). Any subtree that holds no tensor is one JSON value at
its path. Values JSON cannot hold exactly (tuples, bytes, dicts with non-string keys) are
tagged; anything else is pickled only when the caller allows it, on save and on load.
"""

from __future__ import annotations

import base64
import math
import pickle
from collections.abc import Iterator
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
    if is_tensor_leaf(state) or not _contains_tensor(state):
        if not prefix:
            raise LayoutError("the state to save must be a dict (or list) of tensors and values")
        yield prefix, state, is_tensor_leaf(state)
        return
    if isinstance(state, dict):
        items: Any = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:  # pragma: no cover - _contains_tensor is False for anything else
        raise LayoutError(f"cannot flatten {type(state).__name__} at {prefix}")
    seen: set[str] = set()
    for k, v in items:
        name = _key(k, prefix)
        if name in seen:
            raise LayoutError(f"state keys {k!r} collide at {prefix or '<root>'} once made strings")
        seen.add(name)
        yield from flatten(v, f"{prefix}/{name}" if prefix else name)


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


def decode_value(j: Any, *, allow_pickle: bool, where: str) -> Any:
    if isinstance(j, list):
        return [decode_value(x, allow_pickle=allow_pickle, where=where) for x in j]
    if not isinstance(j, dict):
        return j
    tag = j.get(_TAG)
    if tag is None:
        return {k: decode_value(x, allow_pickle=allow_pickle, where=f"{where}/{k}") for k, x in j.items()}
    v = j.get("v")
    if tag == "float":
        return float(v)
    if tag == "tuple":
        return tuple(decode_value(x, allow_pickle=allow_pickle, where=where) for x in v)
    if tag == "dict":
        return {k: decode_value(x, allow_pickle=allow_pickle, where=where) for k, x in v}
    if tag == "bytes":
        return base64.b64decode(v)
    if tag == "pickle":
        if not allow_pickle:
            raise UnsupportedValueError(
                f"value at {where!r} is pickled; loading it runs code from the checkpoint. Pass "
                "allow_pickle=True to load only if you trust where the checkpoint came from"
            )
        return pickle.loads(base64.b64decode(v))  # noqa: S301 - the caller opted in
    raise UnsupportedValueError(f"value at {where!r} has an unknown tag {tag!r}; upgrade ckpt to read it")
