"""Storage: one small interface over local files and every fsspec filesystem.

Paths given to a :class:`Storage` are relative to its root and ``/``-separated. Chunk writes
need not be atomic (the commit point protects readers); ``write_atomic`` is, and it is what
fragments and the commit point use: temp file + fsync + rename on POSIX, a single object PUT
on object stores (which is atomic there, and needs no rename).

Transient errors (timeouts, connection resets, throttling, EIO) are retried with exponential
backoff by :class:`RetryingStorage`; permanent ones (missing file, permission, no space) are
raised at once.
"""

from __future__ import annotations

import abc
import ctypes
import errno
import fcntl
import logging
import os
import posixpath
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import crc32c
import tenacity

from .errors import CkptError, StorageError

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview
T = TypeVar("T")

# Object stores whose single PUT is atomic: the commit point needs no rename there.
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oss", "r2"})
_PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM})
_TRANSIENT_NAME_HINTS = ("timeout", "throttl", "slowdown", "unavailable", "connection", "reset", "temporar")


def check_relpath(path: str) -> str:
    """Refuse paths that are absolute or would escape the storage root."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise StorageError(f"invalid storage path {path!r}")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise StorageError(f"invalid storage path {path!r}: empty, '.' or '..' component")
    return path


class Storage(abc.ABC):
    """The storage plug point. Implementations: :class:`LocalStorage`, :class:`FsspecStorage`."""

    url: str

    @abc.abstractmethod
    def write(self, path: str, parts: Sequence[Buffer], *, durable: bool = True) -> None:
        """Write the concatenation of ``parts`` to ``path`` (replacing it), creating parents."""

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

    def read_into(self, path: str, buffers: Sequence[memoryview]) -> int:
        """Fill ``buffers`` in order from the start of the object; returns the object's size.

        Raises ``EOFError`` if the object is shorter than the buffers together.
        """
        data = memoryview(self.read(path))
        pos = 0
        for b in buffers:
            n = b.nbytes
            if pos + n > len(data):
                raise EOFError(f"{path}: {len(data)} bytes, expected at least {pos + n}")
            b.cast("B")[:] = data[pos : pos + n]
            pos += n
        return len(data)

    def read_into_crc(self, path: str, data: memoryview, tail: memoryview) -> tuple[int, int]:
        """``read_into(path, [data, tail])``, also returning the crc32c of ``data``."""
        total = self.read_into(path, [data, tail])
        return total, crc32c.crc32c(data)

    def read_threads(self, step: int, default: int) -> int:
        """How many threads should read ``step``'s chunks: ``default`` (the I/O threads asked
        for) unless this storage knows better (a memory tier is bound by the cores, and threads
        beyond them only contend)."""
        return default

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


# Trees removed by delete_detached wait under this name in the root until a background
# process has deleted them; ``ckpt gc`` removes any left by a crash.
TRASH_PREFIX = ".trash-"
DIRECT_ALIGN = 4096  # covers 512- and 4096-byte logical blocks
DIRECT_MIN_BYTES = 256 * 1024  # below this, the page cache is cheaper than a synchronous device write


def _write_all(fd: int, view: memoryview) -> None:
    while view.nbytes:
        n = os.write(fd, view)
        view = view[n:]


def _load_syncfs() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()


class LocalStorage(Storage):
    """POSIX files under a root directory; fsync for durability; rename for atomicity."""

    def __init__(self, root: str, *, direct_io: bool = True) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = "file://" + self.root
        # Large chunk bodies written with O_DIRECT from page-aligned host memory skip the
        # page cache: a tenth of the kernel CPU of a buffered write, and no dirty pages for
        # the kernel to flush later (what a training process sharing the cores notices).
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")

    def _abs(self, path: str) -> str:
        return os.path.join(self.root, *check_relpath(path).split("/"))

    def write(self, path: str, parts: Sequence[Buffer], *, durable: bool = True) -> None:
        target = self._abs(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        views = [memoryview(part).cast("B") for part in parts]
        direct = self._direct_prefix(views[0]) if self.direct_io and views else 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = -1
        if direct:
            try:
                fd = os.open(target, flags | os.O_DIRECT, 0o644)
            except OSError as e:  # this filesystem has no O_DIRECT (tmpfs, some FUSE): stop trying
                if e.errno != errno.EINVAL:
                    raise
                self.direct_io, direct = False, 0
        if fd < 0:
            fd = os.open(target, flags, 0o644)
        try:
            if direct:
                try:
                    _write_all(fd, views[0][:direct])
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self.direct_io, direct = False, 0  # alignment refused: rewrite buffered
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                views[0] = views[0][direct:]
            for view in views:
                _write_all(fd, view)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _direct_prefix(self, view: memoryview) -> int:
        """How many leading bytes of ``view`` can bypass the page cache (0: none)."""
        n = view.nbytes // DIRECT_ALIGN * DIRECT_ALIGN
        if n < DIRECT_MIN_BYTES or view.readonly:
            return 0
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        return n if address % DIRECT_ALIGN == 0 else 0

    @property
    def can_sync(self) -> bool:
        return _SYNCFS is not None

    def sync(self, paths: Sequence[str]) -> None:
        """One ``syncfs`` of the filesystem instead of one ``fsync`` per file (Linux)."""
        if _SYNCFS is None:
            return super().sync(paths)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            if _SYNCFS(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs of {self.root} failed: {os.strerror(err)}")
        finally:
            os.close(fd)

    def write_atomic(self, path: str, data: bytes) -> None:
        target = self._abs(path)
        parent = os.path.dirname(target)
        tmp = os.path.join(parent, f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
        self.write(posixpath.relpath(tmp, self.root).replace(os.sep, "/"), [data], durable=True)
        try:
            os.replace(tmp, target)
        except BaseException:
            _remove_quietly(tmp)
            raise
        _fsync_dir(parent)

    def read(self, path: str) -> bytes:
        with open(self._abs(path), "rb") as f:
            return f.read()

    def read_into(self, path: str, buffers: Sequence[memoryview]) -> int:
        fd = os.open(self._abs(path), os.O_RDONLY)
        try:
            total = os.fstat(fd).st_size
            views = [memoryview(b).cast("B") for b in buffers]
            want = sum(v.nbytes for v in views)
            if total < want:
                raise EOFError(f"{path}: {total} bytes, expected at least {want}")
            offset = 0
            while views:
                n = os.preadv(fd, views, offset)
                if n == 0:
                    raise EOFError(f"{path}: short read at offset {offset}")
                offset += n
                while views and n >= views[0].nbytes:
                    n -= views[0].nbytes
                    views.pop(0)
                if views and n:
                    views[0] = views[0][n:]
            return total
        finally:
            os.close(fd)

    # The crc of each piece is computed right after reading it, while it is in the CPU cache:
    # one pass over memory instead of two (the checksum pass re-read the whole chunk from RAM).
    CRC_PIECE = 256 << 10

    def read_into_crc(self, path: str, data: memoryview, tail: memoryview) -> tuple[int, int]:
        fd = os.open(self._abs(path), os.O_RDONLY)
        try:
            total = os.fstat(fd).st_size
            data, tail = memoryview(data).cast("B"), memoryview(tail).cast("B")
            if total < data.nbytes + tail.nbytes:
                raise EOFError(f"{path}: {total} bytes, expected at least {data.nbytes + tail.nbytes}")
            crc = offset = 0
            while offset < data.nbytes:
                n = os.preadv(fd, [data[offset : offset + self.CRC_PIECE]], offset)
                if n == 0:
                    raise EOFError(f"{path}: short read at offset {offset}")
                crc = crc32c.crc32c(data[offset : offset + n], crc)
                offset += n
            while tail.nbytes:
                n = os.preadv(fd, [tail], offset)
                if n == 0:
                    raise EOFError(f"{path}: short read at offset {offset}")
                offset += n
                tail = tail[n:]
            return total, crc
        finally:
            os.close(fd)

    def size(self, path: str) -> int | None:
        try:
            return os.stat(self._abs(path)).st_size
        except FileNotFoundError:
            return None

    def list_dir(self, path: str) -> list[str]:
        target = self.root if path in ("", ".") else self._abs(path)
        try:
            return sorted(os.listdir(target))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def walk_times(self, path: str) -> dict[str, tuple[int, float | None]]:
        base = self._abs(path)
        out: dict[str, tuple[int, float | None]] = {}
        for dirpath, _dirs, files in os.walk(base):
            rel_dir = os.path.relpath(dirpath, base)
            for name in files:
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                rel = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
                out[rel] = (st.st_size, st.st_mtime)
        return out

    def delete_detached(self, path: str) -> None:
        """Rename the tree out of the run (atomic), then delete it in a separate process at
        the lowest CPU priority: unlinking a checkpoint's thousand files costs the training
        process neither CPU time nor the GIL."""
        target = self._abs(path)
        if not os.path.isdir(target) or os.path.islink(target):
            return self.delete(path, recursive=True)
        trash = os.path.join(self.root, f"{TRASH_PREFIX}{os.path.basename(target)}-{uuid.uuid4().hex[:8]}")
        os.rename(target, trash)
        try:
            subprocess.Popen(["nice", "-n", "19", "rm", "-rf", "--", trash], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError:  # no nice/rm on this system: delete here
            log.debug("background deletion unavailable; deleting %s in process", trash, exc_info=True)
            self.delete(posixpath.relpath(trash, self.root).replace(os.sep, "/"), recursive=True)

    def delete(self, path: str, *, recursive: bool = False) -> None:
        import shutil

        target = self._abs(path)
        if os.path.isdir(target) and not os.path.islink(target):
            if recursive:
                # Only vanishing entries are fine (a concurrent delete); anything else must be
                # reported, or gc would count a step as deleted while its files remain.
                def ignore_missing(_fn: Any, _path: str, exc: Any) -> None:
                    err = exc[1] if isinstance(exc, tuple) else exc
                    if not isinstance(err, FileNotFoundError):
                        raise err

                if sys.version_info >= (3, 12):
                    shutil.rmtree(target, onexc=ignore_missing)
                else:
                    shutil.rmtree(target, onerror=ignore_missing)
            else:
                os.rmdir(target)
        else:
            _remove_quietly(target)


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

    def write(self, path: str, parts: Sequence[Buffer], *, durable: bool = True) -> None:
        target = self._abs(path)
        if not self.atomic_put:
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if len(parts) == 1:
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
    import datetime

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


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; rename already happened
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Retries


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """How transient storage errors are retried (exponential backoff with jitter)."""

    attempts: int = 5
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be >= 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("RetryPolicy: need 0 <= initial_backoff_s <= max_backoff_s")


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same storage call may succeed."""
    if isinstance(exc, (CkptError, FileNotFoundError, FileExistsError, PermissionError,
                        IsADirectoryError, NotADirectoryError, EOFError, ValueError, TypeError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS
    name = type(exc).__name__.lower()
    return any(h in name for h in _TRANSIENT_NAME_HINTS)


class RetryingStorage(Storage):
    """Wraps a storage; retries transient errors, raises permanent ones at once."""

    def __init__(self, inner: Storage, policy: RetryPolicy) -> None:
        self.inner = inner
        self.policy = policy
        self.url = inner.url

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.policy.attempts),
            wait=tenacity.wait_random_exponential(
                multiplier=self.policy.initial_backoff_s, max=self.policy.max_backoff_s
            ),
            retry=tenacity.retry_if_exception(is_transient),
            before_sleep=lambda rs: log.warning(
                "storage %s failed (attempt %d/%d), retrying: %s",
                what, rs.attempt_number, self.policy.attempts, rs.outcome.exception() if rs.outcome else "",
            ),
            reraise=True,
        )
        try:
            return retrying(fn)
        except Exception as e:
            if is_transient(e):
                raise StorageError(
                    f"storage {what} on {self.url} failed after {self.policy.attempts} attempts: {e}"
                ) from e
            if not isinstance(e, (CkptError, OSError, EOFError, ValueError, TypeError)):
                # A filesystem client's own error (botocore's NoCredentialsError, ...): callers
                # catch StorageError, not every backend's exception hierarchy.
                raise StorageError(f"storage {what} on {self.url} failed: {type(e).__name__}: {e}") from e
            raise

    def write(self, path: str, parts: Sequence[Buffer], *, durable: bool = True) -> None:
        self._call(f"write {path}", lambda: self.inner.write(path, parts, durable=durable))

    def write_atomic(self, path: str, data: bytes) -> None:
        self._call(f"write {path}", lambda: self.inner.write_atomic(path, data))

    @property
    def can_sync(self) -> bool:
        return self.inner.can_sync

    def sync(self, paths: Sequence[str]) -> None:
        self._call("sync", lambda: self.inner.sync(paths))

    def delete_detached(self, path: str) -> None:
        self._call(f"delete {path}", lambda: self.inner.delete_detached(path))

    def read(self, path: str) -> bytes:
        return self._call(f"read {path}", lambda: self.inner.read(path))

    def read_into(self, path: str, buffers: Sequence[memoryview]) -> int:
        return self._call(f"read {path}", lambda: self.inner.read_into(path, buffers))

    def read_into_crc(self, path: str, data: memoryview, tail: memoryview) -> tuple[int, int]:
        return self._call(f"read {path}", lambda: self.inner.read_into_crc(path, data, tail))

    def size(self, path: str) -> int | None:
        return self._call(f"stat {path}", lambda: self.inner.size(path))

    def list_dir(self, path: str) -> list[str]:
        return self._call(f"list {path}", lambda: self.inner.list_dir(path))

    def walk(self, path: str) -> dict[str, int]:
        return self._call(f"list {path}", lambda: self.inner.walk(path))

    def walk_times(self, path: str) -> dict[str, tuple[int, float | None]]:
        return self._call(f"list {path}", lambda: self.inner.walk_times(path))

    def delete(self, path: str, *, recursive: bool = False) -> None:
        self._call(f"delete {path}", lambda: self.inner.delete(path, recursive=recursive))


def open_storage(
    url: str | os.PathLike[str] | Storage,
    *,
    storage_options: dict[str, Any] | None = None,
    retry: RetryPolicy | None = None,
) -> Storage:
    """A storage for a run URL: a local path, ``file://``, or any fsspec URL.

    Unknown schemes get an error saying which package to install.
    """
    if isinstance(url, Storage):
        return url
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise StorageError(f"invalid checkpoint URL {url!r}: give a path or an fsspec URL")
    if "://" not in url or url.startswith("file://"):
        inner: Storage = LocalStorage(url.removeprefix("file://"))
    else:
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except ImportError as e:
            raise StorageError(f"cannot open {url!r}: {e}") from None
        except ValueError as e:
            scheme = url.split("://", 1)[0]
            raise StorageError(
                f"cannot open {url!r}: unknown URL scheme {scheme!r} ({e}); "
                "use a local path or a URL of an installed fsspec filesystem"
            ) from None
        inner = FsspecStorage(fs, root, url)
    return RetryingStorage(inner, retry or RetryPolicy())
