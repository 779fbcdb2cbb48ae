"""What :func:`ckpt.verify.verify_step` finds: problem kinds, :class:`Problem`, :class:`VerifyReport`.

The kinds are stable strings, and ``to_dict`` of a report is the document ``ckpt verify --json``
prints per step: scripts read both, so they change only with the CLI's documented output. A
problem's message is a whole sentence that names the tensor and the chunk (with its storage
key) it concerns, as ``ckpt verify`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .manifest import ArraySpec
from .planning import chunk_key

# Problem kinds, stable strings for scripts that read ``ckpt verify --json``.
MISSING = "missing"  # a chunk, array metadata, group metadata or fragment is absent
TRUNCATED = "truncated"  # a chunk shorter than a full chunk + checksum
SIZE = "size"  # a chunk longer than expected, or a fragment records another size
CHECKSUM = "checksum"  # the stored crc32c does not match the data
RECORDED_CRC = "recorded_crc"  # data and stored crc agree, but not with the writer's record
UNRECORDED = "unrecorded"  # no writer's fragment records the chunk
DUPLICATE = "duplicate"  # two writers' fragments record the chunk
OUTSIDE = "outside"  # a fragment records a chunk outside the grid or of an unknown array
METADATA = "metadata"  # a zarr.json that is unreadable or disagrees with the manifest
FRAGMENT = "fragment"  # a fragment that is unreadable or belongs to another save
MANIFEST = "manifest"  # the commit point itself is unreadable
UNREADABLE = "unreadable"  # storage refused to read an object (permission, not a file, ...)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a checkpoint; ``message`` is a whole sentence naming what and where."""

    kind: str
    message: str
    path: str | None = None  # tensor path, when the problem concerns one tensor
    index: tuple[int, ...] | None = None  # chunk index, when it concerns one chunk
    key: str | None = None  # storage key relative to the step directory
    writer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "tensor": self.path,
            "chunk": list(self.index) if self.index is not None else None,
            "key": self.key,
            "writer": self.writer,
        }


@dataclass(slots=True)
class VerifyReport:
    """What :func:`ckpt.verify.verify_step` checked and every problem it found (empty when all is well)."""

    step: int
    arrays: int = 0
    chunks: int = 0
    bytes: int = 0
    writers: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "ok": self.ok,
            "arrays": self.arrays,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "writers": self.writers,
            "problems": [p.to_dict() for p in self.problems],
        }


def chunk_name(index: tuple[int, ...]) -> str:
    return ".".join(map(str, index)) or "()"


def chunk_problem(kind: str, spec: ArraySpec, index: tuple[int, ...], what: str, writer: str | None = None) -> Problem:
    """A problem with one chunk, named by tensor, chunk index and storage key."""
    key = chunk_key(spec.path, index, spec.chunk_separator)
    return Problem(
        kind, f"tensor {spec.path!r} chunk {chunk_name(index)} ({key}): {what}", spec.path, index, key, writer
    )
