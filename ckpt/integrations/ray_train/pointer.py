"""The pointer checkpoint: what Ray Train stores for one committed ckpt step.

A pointer is a directory holding one small JSON document, ``ckpt_pointer.json``: the URL of
the ckpt run and the step. Ray Train uploads, lists, hands back (``ray.train.get_checkpoint()``)
and deletes these directories; the tensors stay in the ckpt run, written once by every rank.

This module imports neither Ray nor torch: the document is the contract, versioned, with
``to_dict``/``from_dict``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ...errors import FormatError

POINTER_FILE = "ckpt_pointer.json"
POINTER_KIND = "ckpt-pointer"
POINTER_VERSION = 1
# The metric that names the step of a reported pointer (Ray Train hands the metrics back with
# every checkpoint it lists, so retention needs no storage read per listed checkpoint).
STEP_METRIC = "ckpt_step"


@dataclass(frozen=True, kw_only=True, slots=True)
class Pointer:
    """One committed step of one ckpt run. ``world_size``: the number of training workers that
    saved it (informational: restore reshards to whatever the job has now)."""

    url: str
    step: int
    world_size: int
    experiment: str | None = None  # the Ray Train run that reported it

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url:
            raise ValueError(f"Pointer.url must be a non-empty URL, got {self.url!r}")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"Pointer.step must be an integer >= 0, got {self.step!r}")
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"Pointer.world_size must be an integer >= 1, got {self.world_size!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": POINTER_KIND,
            "version": POINTER_VERSION,
            "url": self.url,
            "step": self.step,
            "world_size": self.world_size,
            "experiment": self.experiment,
        }

    @classmethod
    def from_dict(cls, doc: Any, *, where: str = "pointer") -> Pointer:
        if not isinstance(doc, dict) or doc.get("kind") != POINTER_KIND:
            raise FormatError(f"{where} is not a ckpt pointer (no kind {POINTER_KIND!r})")
        version = doc.get("version")
        if not isinstance(version, int) or version > POINTER_VERSION:
            raise FormatError(
                f"{where}: pointer version {version!r} is newer than this ckpt understands "
                f"({POINTER_VERSION}); upgrade ckpt"
            )
        try:
            return cls(url=doc["url"], step=doc["step"], world_size=doc["world_size"], experiment=doc.get("experiment"))
        except (KeyError, ValueError) as e:
            raise FormatError(f"{where}: invalid pointer: {e}") from None

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str = "pointer") -> Pointer:
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise FormatError(f"{where} is not valid JSON: {e}") from None
        return cls.from_dict(doc, where=where)


def write_pointer_dir(directory: str | os.PathLike[str], pointer: Pointer) -> str:
    """Write ``pointer`` into ``directory`` (a local directory that becomes a Ray checkpoint)."""
    path = os.path.join(os.fspath(directory), POINTER_FILE)
    with open(path, "wb") as f:
        f.write(pointer.to_json())
    return path


def read_pointer(checkpoint: Any) -> Pointer:
    """The pointer inside a Ray Train ``Checkpoint`` (as ``ray.train.get_checkpoint()`` or
    ``Result.checkpoint`` hand it out), read straight from its filesystem: nothing is
    downloaded but the one small document."""
    path = f"{checkpoint.path.rstrip('/')}/{POINTER_FILE}"
    try:
        with checkpoint.filesystem.open_input_stream(path) as f:
            data = f.read()
    except FileNotFoundError:
        raise FormatError(
            f"Ray checkpoint {checkpoint.path} holds no {POINTER_FILE}: it was not reported by "
            "ckpt.integrations.ray_train (restore it with the code that wrote it)"
        ) from None
    return Pointer.from_json(data, where=path)
