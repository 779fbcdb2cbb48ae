"""Between DCP's flat keys and ckpt's paths and values.

DCP flattens a state dict into keys (``model.layer.weight``) with, in its planner data, the
object path of each (``("model", "layer.weight")``; dict keys as strings, list indices as
ints). It walks into every dict, and into a list when the list holds a tensor or a dict; every
other leaf is one value, stored as ``torch.save`` bytes. ckpt's paths join the object path with
``/`` (``model/layer.weight``), and any subtree without a tensor is ONE value
(``ckpt.state.flatten``). So:

- a tensor's ckpt path is its object path joined with ``/``; the lists it sits in are recorded
  as containers (``ckpt.state.container_kinds``);
- DCP's value leaves are regrouped under the shortest prefix that holds no tensor (the value
  ckpt.load and ckpt.read see), each leaf decoded with ``torch.load(weights_only=True)`` into
  JSON where it can be, else kept as the bytes it came in (:class:`~ckpt.state.Opaque`);
- the other way, a ckpt value is walked with DCP's own traversal into the leaves DCP expects,
  each written as ``torch.save`` bytes (an opaque value as the bytes it was stored as).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import traverse_state_dict

from ..errors import LayoutError, UnsupportedValueError
from ..state import Opaque, check_component, encode_value

ObjPath = tuple[str | int, ...]


def fqn_of(path: ObjPath) -> str:
    """DCP's flat key of an object path."""
    return ".".join(map(str, path))


def ckpt_path(path: ObjPath) -> str:
    """The ckpt path of a DCP object path (``("model", "w")`` -> ``model/w``)."""
    if not path:
        raise LayoutError("an empty DCP key cannot be stored")
    where = ""
    for c in path:
        check_component(str(c), where)
        where = f"{where}/{c}" if where else str(c)
    return where


def obj_path(path: str, containers: Mapping[str, Any]) -> ObjPath:
    """The DCP object path of a ckpt path: components that index a list or tuple are ints."""
    parts = path.split("/")
    out: list[str | int] = []
    for i, p in enumerate(parts):
        kind = containers.get("/".join(parts[:i]))
        out.append(int(p) if kind in ("list", "tuple") and p.isdigit() else p)
    return tuple(out)


def list_containers(tensor_paths: Iterable[ObjPath]) -> dict[str, str]:
    """The containers of tensors that DCP walked as lists (an int component follows them)."""
    out: dict[str, str] = {}
    for p in tensor_paths:
        for i in range(1, len(p)):
            if isinstance(p[i], int) and not isinstance(p[i], bool):
                out["/".join(map(str, p[:i]))] = "list"
    return out


def value_groups(value_paths: Iterable[ObjPath], tensor_paths: Iterable[ObjPath]) -> dict[ObjPath, list[ObjPath]]:
    """DCP's value leaves grouped under the ckpt value each belongs to: the shortest prefix of
    the leaf's path that holds no tensor."""
    holders = {p[:i] for p in tensor_paths for i in range(1, len(p) + 1)}
    groups: dict[ObjPath, list[ObjPath]] = {}
    for v in value_paths:
        k = next(k for k in range(1, len(v) + 1) if v[:k] not in holders)
        groups.setdefault(v[:k], []).append(v)
    return groups


def assemble(root: ObjPath, members: Mapping[ObjPath, Any]) -> Any:
    """The value at ``root`` rebuilt from its DCP leaves (str components: dict keys; int: list
    indices; an element DCP had no leaf for, an empty dict, comes back as ``{}``)."""
    if root in members:
        return members[root]
    tree: dict[Any, Any] = {}
    for path, value in members.items():
        node = tree
        rest = path[len(root):]
        for c in rest[:-1]:
            node = node.setdefault(c, {})
        node[rest[-1]] = value
    return _lists(tree)


def _lists(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    items = {k: _lists(v) for k, v in node.items()}
    if items and all(isinstance(k, int) and not isinstance(k, bool) for k in items):
        return [items.get(i, {}) for i in range(max(items) + 1)]
    return items


def decode_leaf(raw: bytes) -> Any:
    """A DCP value leaf (``torch.save`` bytes): the value when ``torch.load(weights_only=True)``
    reads it and JSON holds it exactly, else the bytes kept opaque. Never unpickles anything
    outside torch's weights-only allow-list."""
    try:
        value = torch.load(io.BytesIO(raw), weights_only=True)
        encode_value(value, allow_pickle=False, where="")
    except Exception:  # noqa: BLE001 - whatever it is, it stays the bytes it came in
        return Opaque(bytes(raw))
    return value


def dcp_leaves(prefix: ObjPath, value: Any) -> list[tuple[ObjPath, Any]]:
    """The leaves DCP's traversal makes of ``value`` sitting at ``prefix``."""
    out: list[tuple[ObjPath, Any]] = []
    traverse_state_dict({"_": value}, lambda path, leaf: out.append((prefix + tuple(path[1:]), leaf)))
    return out


def leaf_bytes(leaf: Any, *, allow_pickle: bool, where: str) -> bytes:
    """The bytes DCP expects for a value leaf: ``torch.save`` of it; an opaque leaf stored by
    ``torch.save`` as it is. DCP unpickles them on load, so an opaque leaf needs ``allow_pickle``."""
    if isinstance(leaf, Opaque):
        if not allow_pickle:
            raise UnsupportedValueError(
                f"value {where!r} is kept as bytes that only an unpickler decodes; DCP would unpickle it. Pass "
                "allow_pickle=True (--allow-pickle) if you trust where the checkpoint came from, or leave it out")
        if leaf.kind == "torch":
            return leaf.data
        leaf = leaf.decode()
    buf = io.BytesIO()
    torch.save(leaf, buf)
    return buf.getvalue()
