"""The one forwarding base for anything that wraps a storage.

A wrapper overrides only what it changes; everything else, capabilities included (``can_sync``,
``sync``, ``delete_detached``), reaches the wrapped storage unchanged. ``exists`` is not
forwarded: it asks this wrapper's ``size``, so a wrapper that serves keys of its own (a memory
tier) answers for them. Retries, byte counting,
fault injection and the memory tiers of a restore all derive from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .base import Buffer, OnPiece, Storage


class StorageWrapper(Storage):
    """Forwards every call to ``inner``."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.url = inner.url

    def write(self, path: str, parts: Iterable[Buffer], *, durable: bool = True) -> None:
        self.inner.write(path, parts, durable=durable)

    @property
    def can_sync(self) -> bool:
        return self.inner.can_sync

    def sync(self, paths: Sequence[str]) -> None:
        self.inner.sync(paths)

    def write_atomic(self, path: str, data: bytes) -> None:
        self.inner.write_atomic(path, data)

    def read(self, path: str) -> bytes:
        return self.inner.read(path)

    def read_into(self, path: str, buffers: Sequence[memoryview], *, on_piece: OnPiece | None = None) -> int:
        return self.inner.read_into(path, buffers, on_piece=on_piece)

    def read_range_into(self, path: str, offset: int, buffers: Sequence[memoryview], *,
                        on_piece: OnPiece | None = None) -> None:
        self.inner.read_range_into(path, offset, buffers, on_piece=on_piece)

    def size(self, path: str) -> int | None:
        return self.inner.size(path)

    def list_dir(self, path: str) -> list[str]:
        return self.inner.list_dir(path)

    def walk_times(self, path: str) -> dict[str, tuple[int, float | None]]:
        return self.inner.walk_times(path)

    def walk(self, path: str) -> dict[str, int]:
        return self.inner.walk(path)

    def delete(self, path: str, *, recursive: bool = False) -> None:
        self.inner.delete(path, recursive=recursive)

    def delete_detached(self, path: str) -> None:
        self.inner.delete_detached(path)
