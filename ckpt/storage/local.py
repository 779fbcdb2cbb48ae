"""Local POSIX storage: fsync for durability, rename for atomicity, O_DIRECT for large chunk
bodies, one ``syncfs`` for many files, and deletion of old steps in a separate process."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import posixpath
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from .base import TRASH_PREFIX, Buffer, OnPiece, Storage, check_relpath

log = logging.getLogger(__name__)

DIRECT_ALIGN = 4096  # covers 512- and 4096-byte logical blocks
DIRECT_MIN_BYTES = 256 * 1024  # below this, the page cache is cheaper than a synchronous device write


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


class _Writer:
    """One file's parts in as few system calls as it takes: the page-aligned bodies of large
    parts through a second descriptor opened with O_DIRECT, at their offsets; everything else
    gathered and written with ``pwritev``. Each system call releases the GIL and takes it back,
    and in a training process every taking back may wait behind the training loop's thread:
    a pack of 600 chunks written part by part (with O_DIRECT switched on and off with
    ``fcntl``) took about 9 system calls per chunk (6,000 per checkpoint); gathered, a handful per pack."""

    def __init__(self, storage: LocalStorage, target: str, fd: int) -> None:
        self.storage, self.target, self.fd = storage, target, fd
        self.direct_fd: int | None = None
        self.pending: list[memoryview] = []
        self.start = 0  # file offset of the first pending byte
        self.pos = 0  # file offset of the next byte

    def write(self, parts: Iterable[Buffer]) -> None:
        st = self.storage
        # Parts a generator yields may reuse one buffer: only those of a list (held by the
        # caller in any case) are gathered.
        gather = _IOV_MAX if isinstance(parts, (list, tuple)) else 1
        try:
            for part in parts:  # one at a time: a re-iterable of parts is never held whole
                view = memoryview(part).cast("B")
                direct = st._direct_prefix(view) if st.direct_io and self.pos % DIRECT_ALIGN == 0 else 0
                if direct and self._write_direct(view[:direct]):
                    view = view[direct:]
                if view.nbytes:
                    self.pending.append(view)
                    self.pos += view.nbytes
                    if len(self.pending) >= gather:
                        self._flush()
            self._flush()
        finally:
            if self.direct_fd is not None:
                os.close(self.direct_fd)

    def _flush(self) -> None:
        views, at, i = self.pending, self.start, 0
        while i < len(views):
            n = os.pwritev(self.fd, views[i:] if i else views, at)
            at += n
            while i < len(views) and n >= views[i].nbytes:
                n -= views[i].nbytes
                i += 1
            if n:  # a short write inside a part
                views[i] = views[i][n:]
        self.pending, self.start = [], self.pos

    def _write_direct(self, view: memoryview) -> bool:
        """Write ``view`` (page-aligned in memory, in the file and in length) bypassing the page
        cache (buffered, and direct I/O off for this storage, where the filesystem refuses the
        alignment); False where it has no O_DIRECT (the caller writes it buffered)."""
        self._flush()
        if self.direct_fd is None:
            try:
                self.direct_fd = os.open(self.target, os.O_WRONLY | os.O_DIRECT)
            except OSError:  # this filesystem has no O_DIRECT (some FUSE, older tmpfs): stop trying
                self.storage.direct_io = False
                return False
        at, end = self.pos, self.pos + view.nbytes
        try:
            while at < end:
                at += os.pwrite(self.direct_fd, view[at - self.pos:], at)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.storage.direct_io = False  # alignment refused: written buffered
            while at < end:
                at += os.pwrite(self.fd, view[at - self.pos:], at)
        self.pos = self.start = at
        return True


_IN_MEMORY_FS = frozenset({"tmpfs", "ramfs", "hugetlbfs"})


def fs_type(path: str) -> str | None:
    """The type of the filesystem that holds ``path`` (or would hold it: its nearest existing
    ancestor), from the mount table; None where there is none to read."""
    path = os.path.realpath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    best, kind = "", None
    for point, fstype in mounts:
        point = point.replace("\\040", " ")
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fstype
    return kind


_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


class LocalStorage(Storage):
    """POSIX files under a root directory; fsync for durability; rename for atomicity."""

    def __init__(self, root: str, *, direct_io: bool = True) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.url = "file://" + self.root
        # Large chunk bodies written with O_DIRECT from page-aligned host memory skip the
        # page cache: a tenth of the kernel CPU of a buffered write, and no dirty pages for
        # the kernel to flush later (what a training process sharing the cores notices).
        # In memory (tmpfs), the page cache is the storage: O_DIRECT bypasses nothing and costs
        # two system calls per chunk instead of one per batch of chunks.
        self.direct_io = direct_io and hasattr(os, "O_DIRECT") and fs_type(self.root) not in _IN_MEMORY_FS

    def _abs(self, path: str) -> str:
        return os.path.join(self.root, *check_relpath(path).split("/"))

    def write(self, path: str, parts: Iterable[Buffer], *, durable: bool = True) -> None:
        target = self._abs(path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _Writer(self, target, fd).write(parts)
            if durable:
                os.fsync(fd)  # the inode: covers what the O_DIRECT descriptor wrote
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

    # A read lands in pieces of this size, each handed to ``on_piece`` while it is still in the
    # CPU cache (a checksum of the piece then costs no second pass over memory).
    PIECE = 256 << 10

    def read_into(self, path: str, buffers: Sequence[memoryview], *, on_piece: OnPiece | None = None) -> int:
        fd = os.open(self._abs(path), os.O_RDONLY)
        try:
            total = os.fstat(fd).st_size
            want = sum(memoryview(b).nbytes for b in buffers)
            if total < want:
                raise EOFError(f"{path}: {total} bytes, expected at least {want}")
            self._pread(fd, path, 0, buffers, on_piece)
            return total
        finally:
            os.close(fd)

    def read_range_into(self, path: str, offset: int, buffers: Sequence[memoryview], *,
                        on_piece: OnPiece | None = None) -> None:
        fd = os.open(self._abs(path), os.O_RDONLY)
        try:
            self._pread(fd, path, offset, buffers, on_piece)
        finally:
            os.close(fd)

    def _pread(self, fd: int, path: str, offset: int, buffers: Sequence[memoryview], on_piece: OnPiece | None) -> None:
        for i, view in enumerate(memoryview(b).cast("B") for b in buffers):
            done = 0
            while done < view.nbytes:
                piece = view[done : done + self.PIECE] if on_piece is not None else view[done:]
                n = os.preadv(fd, [piece], offset)
                if n == 0:
                    raise EOFError(f"{path}: short read at offset {offset}")
                if on_piece is not None:
                    on_piece(i, done, piece[:n])
                done += n
                offset += n

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
        if not _DELETER.send(trash):  # no sh/nice/rm on this system: delete here
            log.debug("background deletion unavailable; deleting %s in process", trash)
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


class _Deleter:
    """One process per training process that deletes the trees it is sent, at the lowest CPU
    priority: a path per line on its standard input. Started at the first deletion (a process
    started per deletion cost the committing thread a fork and exec at every commit), it ends
    when this process closes the pipe (at exit), after the deletions it was sent."""

    SCRIPT = 'while IFS= read -r p; do rm -rf -- "$p"; done'

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._pid = 0  # the process that started it (a forked child starts its own)

    def send(self, path: str) -> bool:
        if "\n" in path:
            return False
        line = (path + "\n").encode()
        with self._lock:
            for _attempt in range(2):
                if self._proc is None or self._pid != os.getpid() or self._proc.poll() is not None:
                    try:
                        self._proc = subprocess.Popen(
                            ["nice", "-n", "19", "sh", "-c", self.SCRIPT], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                    except OSError:
                        self._proc = None
                        return False
                    self._pid = os.getpid()
                try:
                    assert self._proc.stdin is not None
                    self._proc.stdin.write(line)
                    self._proc.stdin.flush()
                    return True
                except OSError:  # it ended: start another
                    self._proc = None
            return False


_DELETER = _Deleter()


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
