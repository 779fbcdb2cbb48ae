"""Any fsspec filesystem (``s3://``, ``gs://``, ``memory://``, …) as a storage."""

from __future__ import annotations

import datetime
import posixpath
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from .base import Buffer, OnPiece, Storage, check_relpath

# Object stores whose single PUT is atomic: the commit point needs no rename there.
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oss", "r2"})


class FsspecStorage(Storage):
    """Any fsspec filesystem (s3://, gs://, memory://, …) under a root prefix."""

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self.atomic_put = any(p in _ATOMIC_PUT_PROTOCOLS for p in protocols)

    def _abs(self, path: str) -> str:
        return f"{self.root}/{check_relpath(path)}" if self.root else check_relpath(path)

    def write(self, path: str, parts: Iterable[Buffer], *, durable: bool = True) -> None:
        target = self._abs(path)
        if not self.atomic_put:
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if isinstance(parts, (list, tuple)) and len(parts) == 1:
            self.fs.pipe_file(target, bytes(parts[0]))
            return
        with self.fs.open(target, "wb") as f:
            for part in parts:
                f.write(part)

    def write_atomic(self, path: str, data: bytes) -> None:
        target = self._abs(path)
        if self.atomic_put:
            self.fs.pipe_file(target, data)
            return
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        tmp = f"{posixpath.dirname(target)}/.{posixpath.basename(target)}.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, target)

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(self._abs(path))

    def read_range_into(self, path: str, offset: int, buffers: Sequence[memoryview], *,
                        on_piece: OnPiece | None = None) -> None:
        want = sum(memoryview(b).nbytes for b in buffers)
        data = memoryview(self.fs.cat_file(self._abs(path), start=offset, end=offset + want))
        if len(data) < want:
            raise EOFError(f"{path}: ends before byte {offset + want}")
        pos = 0
        for i, b in enumerate(buffers):
            view = memoryview(b).cast("B")
            view[:] = data[pos : pos + view.nbytes]
            if on_piece is not None:
                on_piece(i, 0, view)
            pos += view.nbytes

    def size(self, path: str) -> int | None:
        try:
            info = self.fs.info(self._abs(path))
        except FileNotFoundError:
            return None
        if info.get("type") == "directory":
            return None
        return int(info.get("size") or 0)

    def list_dir(self, path: str) -> list[str]:
        target = self.root if path in ("", ".") else self._abs(path)
        try:
            entries = self.fs.ls(target, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted({posixpath.basename(e.rstrip("/")) for e in entries})

    def walk_times(self, path: str) -> dict[str, tuple[int, float | None]]:
        base = self._abs(path).rstrip("/")
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        prefix = base.lstrip("/")
        out: dict[str, tuple[int, float | None]] = {}
        for full, info in found.items():
            name = full.strip("/")
            if info.get("type") == "directory" or not name.startswith(prefix):
                continue
            out[name[len(prefix) :].lstrip("/")] = (int(info.get("size") or 0), _info_mtime(info))
        return out

    def delete(self, path: str, *, recursive: bool = False) -> None:
        try:
            self.fs.rm(self._abs(path), recursive=recursive)
        except FileNotFoundError:
            pass


# Where fsspec backends put a file's time: local, s3, gcs, azure, memory.
_TIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")


def _info_mtime(info: dict) -> float | None:
    for key in _TIME_KEYS:
        v = info.get(key)
        if isinstance(v, datetime.datetime):
            return (v if v.tzinfo else v.replace(tzinfo=datetime.timezone.utc)).timestamp()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):
            try:
                return datetime.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None
