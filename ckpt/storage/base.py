"""The storage plug point: keys and bytes, nothing else.

Paths given to a :class:`Storage` are relative to its root and ``/``-separated. Chunk writes
need not be atomic (the commit point protects readers); ``write_atomic`` is, and it is what
fragments and the commit point use: temp file + fsync + rename on POSIX, a single object PUT
on object stores (which is atomic there, and needs no rename).

What the bytes mean (chunks and their checksums, steps, documents) is decided above this
interface: ``ckpt.chunks`` is the chunk codec, ``ckpt.format`` the layout of a run.
Implementations: ``LocalStorage``, ``FsspecStorage``; ``StorageWrapper`` is the one base for
anything that wraps another storage (retries, counting, fault injection, memory tiers).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence

from ..errors import StorageError

Buffer = bytes | bytearray | memoryview
# Called as pieces of a read land: (index of the buffer, offset within it, the piece). A read
# that is retried starts again at offset 0 of buffer 0.
OnPiece = Callable[[int, int, memoryview], None]

# Trees removed by delete_detached wait under this name in the root until a background
# process has deleted them; ``ckpt gc`` removes any left by a crash.
TRASH_PREFIX = ".trash-"


def check_relpath(path: str) -> str:
    """Refuse paths that are absolute or would escape the storage root."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise StorageError(f"invalid storage path {path!r}")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise StorageError(f"invalid storage path {path!r}: empty, '.' or '..' component")
    return path


class Storage(abc.ABC):
    """Objects under a root, by ``/``-separated key. The calls a checkpoint makes, in order:
    ``write`` (chunks, any thread, any process), ``sync`` once when ``can_sync``, ``write_atomic``
    (fragments, then the commit point), then readers' ``read``/``read_into``/``size``/``list_dir``;
    retention's ``walk_times`` and ``delete``/``delete_detached``."""

    url: str

    @abc.abstractmethod
    def write(self, path: str, parts: Iterable[Buffer], *, durable: bool = True) -> None:
        """Write the concatenation of ``parts`` to ``path`` (replacing it), creating parents.
        ``parts`` may be any re-iterable: it is iterated once per attempt, a part at a time."""

    @property
    def can_sync(self) -> bool:
        """Whether :meth:`sync` can make many files durable at once (then writers pass
        ``durable=False`` per file and call it once)."""
        return False

    def sync(self, paths: Sequence[str]) -> None:
        """Make ``paths``, written with ``durable=False``, durable, all at once."""
        raise NotImplementedError(f"{type(self).__name__} has no sync barrier (can_sync is False)")

    @abc.abstractmethod
    def write_atomic(self, path: str, data: bytes) -> None:
        """Write ``data`` so that readers see either the old object or all of the new one."""

    @abc.abstractmethod
    def read(self, path: str) -> bytes:
        """Whole object; ``FileNotFoundError`` if absent."""

    def read_into(self, path: str, buffers: Sequence[memoryview], *, on_piece: OnPiece | None = None) -> int:
        """Fill ``buffers`` in order from the start of the object; returns the object's size.

        Raises ``EOFError`` if the object is shorter than the buffers together. ``on_piece`` is
        called for every piece as it lands (a caller hashing what it reads does it while the
        piece is still in the CPU cache).
        """
        data = memoryview(self.read(path))
        pos = 0
        for i, b in enumerate(buffers):
            n = b.nbytes
            if pos + n > len(data):
                raise EOFError(f"{path}: {len(data)} bytes, expected at least {pos + n}")
            view = b.cast("B")
            view[:] = data[pos : pos + n]
            if on_piece is not None:
                on_piece(i, 0, view)
            pos += n
        return len(data)

    def read_range_into(self, path: str, offset: int, buffers: Sequence[memoryview], *,
                        on_piece: OnPiece | None = None) -> None:
        """Fill ``buffers`` in order from byte ``offset`` of the object (a part of a pack).

        Raises ``FileNotFoundError`` if absent, ``EOFError`` if the object ends before the
        buffers are full. ``on_piece`` as for :meth:`read_into`."""
        data = memoryview(self.read(path))
        pos = offset
        for i, b in enumerate(buffers):
            n = b.nbytes
            if pos + n > len(data):
                raise EOFError(f"{path}: {len(data)} bytes, expected at least {pos + n}")
            view = b.cast("B")
            view[:] = data[pos : pos + n]
            if on_piece is not None:
                on_piece(i, 0, view)
            pos += n

    @abc.abstractmethod
    def size(self, path: str) -> int | None:
        """Size in bytes, or ``None`` if absent."""

    @abc.abstractmethod
    def list_dir(self, path: str) -> list[str]:
        """Names of the direct children of a directory/prefix; empty if absent."""

    @abc.abstractmethod
    def walk_times(self, path: str) -> dict[str, tuple[int, float | None]]:
        """Every file under ``path``: relative path -> (size, modification time in Unix seconds
        or None if the backend has none). Empty if absent."""

    def walk(self, path: str) -> dict[str, int]:
        """Every file under ``path``: relative path -> size. Empty if absent."""
        return {k: size for k, (size, _t) in self.walk_times(path).items()}

    @abc.abstractmethod
    def delete(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, or a whole tree with ``recursive``. Absent paths are fine."""

    def delete_detached(self, path: str) -> None:
        """Remove the tree ``path`` without making the caller do the work where the storage
        can: it is gone from listings on return, its contents may be freed later."""
        self.delete(path, recursive=True)

    def exists(self, path: str) -> bool:
        return self.size(path) is not None

    def join(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in parts if p)
