"""A Lightning checkpoint dict as a ckpt state, and back, without pickling.

Lightning's checkpoint is a dict of tensors (``state_dict``, ``optimizer_states``, a callback's
``best_model_score``) and plain values (``loops``, ``lr_schedulers``, ``hyper_parameters``,
``epoch``, ``global_step``). ckpt stores the tensors as arrays at their key paths and every
tensor-free subtree as one JSON value (tuples, bytes, int keys and non-finite floats are kept
exactly). Two things need care:

- keys on the path to a tensor become storage path components, and Lightning's are not always
  fit for that: ``ModelCheckpoint`` keys ``best_k_models`` by checkpoint *path* (``/`` in a
  key). Such keys are percent-encoded (``urllib.parse.quote``) and the renaming is recorded in
  the checkpoint (:data:`MARKER`), so that :func:`from_ckpt` gives the keys back exactly;
- dict subclasses (``OrderedDict``, ``AttributeDict``) come back as dicts, in the same order
  where they hold no tensor (sorted by key where they do);
- values JSON cannot hold (a ``pathlib.Path`` or an ``argparse.Namespace`` in the
  hyper-parameters) are refused with the path of the value, unless the caller allows pickle on
  save and on load.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import torch

from ckpt.errors import LayoutError, UnsupportedValueError
from ckpt.state import check_component, encode_value, is_tensor_leaf

# A top-level value of every checkpoint this integration writes: its format and the renamed keys.
MARKER = "ckpt.lightning"
FORMAT = 1


def _has_tensor(x: Any) -> bool:
    if is_tensor_leaf(x):
        return True
    if isinstance(x, dict):
        return any(_has_tensor(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_has_tensor(v) for v in x)
    return False


def _fit(key: Any, where: str) -> bool:
    if isinstance(key, int) and not isinstance(key, bool):
        return True
    if not isinstance(key, str):
        raise UnsupportedValueError(
            f"key {key!r} ({type(key).__name__}) at {where or '<root>'} holds tensors; only str and int keys "
            "can lead to a tensor: use a str key in on_save_checkpoint/state_dict"
        )
    try:
        check_component(key, where)
    except LayoutError:
        return False
    return True


def _escape(key: str) -> str:
    out = quote(key, safe="")
    if out.startswith("."):
        out = "%2E" + out[1:]
    if out.startswith("_"):
        out = "%5F" + out[1:]
    return out


def _plain(x: Any) -> Any:
    """``x`` with dict subclasses (``OrderedDict``, Lightning's ``AttributeDict``) as dicts, which JSON keeps."""
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if type(x) is tuple:
        return tuple(_plain(v) for v in x)
    return x


def to_ckpt(checkpoint: dict[str, Any], *, allow_pickle: bool = False) -> dict[str, Any]:
    """The state to give ckpt for ``checkpoint`` (a new tree of the same tensors, none copied).

    Raises :class:`~ckpt.errors.UnsupportedValueError` naming the first value JSON cannot hold
    (unless ``allow_pickle``), before anything is written."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f"a Lightning checkpoint is a dict, got {type(checkpoint).__name__}")
    if MARKER in checkpoint:
        raise LayoutError(f"the checkpoint has a key {MARKER!r}, which ckpt.integrations.lightning keeps for itself")
    renamed: list[list[Any]] = []

    def visit(x: Any, where: list[str]) -> Any:
        path = "/".join(where)
        if is_tensor_leaf(x):
            return x
        if not _has_tensor(x):
            x = _plain(x)
            encode_value(x, allow_pickle=allow_pickle, where=path)  # refuse now, with the path
            return x
        if isinstance(x, Mapping):
            out: dict[Any, Any] = {}
            for k, v in x.items():
                name = k
                if not _fit(k, path):
                    name = _escape(k)
                    if name in x:
                        raise LayoutError(f"key {k!r} at {path or '<root>'} escapes to {name!r}, which is also a key")
                    renamed.append([list(where), name, k])
                out[name] = visit(v, [*where, str(name)])
            return out
        seq = [visit(v, [*where, str(i)]) for i, v in enumerate(x)]
        return tuple(seq) if isinstance(x, tuple) else seq

    tree = visit(checkpoint, [])
    tree[MARKER] = {"format": FORMAT, "renamed": renamed}
    return tree


def from_ckpt(tree: dict[str, Any]) -> dict[str, Any]:
    """The Lightning checkpoint ``tree`` (as ``ckpt.read`` gives it) was saved from, keys restored."""
    info = tree.pop(MARKER, None)
    if info is None:
        return tree  # a step not written by this integration: as it is
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise LayoutError(f"this checkpoint's {MARKER!r} record is of an unknown format ({info!r}); upgrade ckpt")
    # Deepest first: a parent's escaped name stays valid until its children are renamed.
    for where, name, original in sorted(info["renamed"], key=lambda r: -len(r[0])):
        node: Any = tree
        for part in where:
            node = node[int(part)] if isinstance(node, (list, tuple)) else node[_key_of(node, part)]
        node[original] = node.pop(name)
    return tree


def _key_of(node: dict[Any, Any], part: str) -> Any:
    if part in node:
        return part
    for k in node:
        if str(k) == part:
            return k
    raise KeyError(part)


def map_location(tree: Any, location: Any) -> Any:
    """``tree``'s tensors (read on CPU) moved as ``torch.load(map_location=location)`` would:
    ``None`` or ``"cpu"`` keeps them, a device (or its name) moves them, a dict maps ``"cpu"``,
    a callable is called as ``location(tensor, "cpu")``."""
    if location is None:
        return tree
    if isinstance(location, dict):
        target = location.get("cpu")
        if target is None:
            return tree
        location = target
    move: Callable[[torch.Tensor], torch.Tensor]
    if callable(location) and not isinstance(location, (str, torch.device)):
        fn = location

        def move(t: torch.Tensor) -> torch.Tensor:
            out = fn(t, "cpu")
            return t if out is None else out
    else:
        device = torch.device(location)
        if device.type == "cpu":
            return tree

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device)

    def visit(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return move(x)
        if isinstance(x, dict):
            return {k: visit(v) for k, v in x.items()}
        if isinstance(x, list):
            return [visit(v) for v in x]
        if isinstance(x, tuple):
            return tuple(visit(v) for v in x)
        return x

    return visit(tree)


def split_url(path: Any) -> tuple[str, str]:
    """``(parent, name)`` of a checkpoint path or URL (``s3://b/run/last.ckpt`` -> ``s3://b/run``, ``last.ckpt``)."""
    url = str(path).rstrip("/")
    if "/" not in url:
        return ".", url
    parent, name = url.rsplit("/", 1)
    if parent.endswith(":/"):  # "s3://bucket" has no parent inside the bucket
        parent += "/"
    return parent or "/", name
