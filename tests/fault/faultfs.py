"""A fault-injecting fsspec filesystem: ``faulty://<path>`` wraps another filesystem.

It is a real :class:`fsspec.AbstractFileSystem` subclass registered under its own protocol, so
``ckpt.open_storage("faulty:///tmp/run", storage_options={"target_protocol": "file",
"faults": plan})`` goes through the same ``FsspecStorage`` and ``RetryingStorage`` as any
fsspec URL. Every call is forwarded to the wrapped filesystem after :class:`FaultPlan` had its
say. Faults (each counted in ``plan.injected``):

- ``transient``: the call fails before doing anything (timeout, connection reset, EIO);
- ``ghost``: the call succeeds, then reports a timeout (the client never heard back);
- ``partial``: a write stores a prefix of the bytes, then the connection drops;
- ``latency``: the call sleeps a little first;
- ``enospc``: writes beyond ``capacity_bytes`` fail with ENOSPC (a permanent error);
- ``down``: while ``plan.down`` is set, or during ``plan.outages`` (ranges of call numbers),
  every call fails (a backend that is gone).

Transient, partial and ghost faults hit at most ``max_consecutive`` of any thread's last eight
calls, so a storage that retries ``max_consecutive + 1`` times always gets through them.
"""

from __future__ import annotations

import errno
import io
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

PROTOCOL = "faulty"

FAULT_WINDOW = 8
WRITE_OPS = frozenset({"pipe_file", "mv", "makedirs", "rm"})
READ_OPS = frozenset({"cat_file", "info", "ls", "find"})


class DroppedConnection(ConnectionResetError):
    """What a partial write ends with."""


@dataclass
class FaultPlan:
    """What to inject, with what probability; thread-safe; counts what it injected."""

    seed: int = 0
    transient: float = 0.0  # per call
    ghost: float = 0.0  # per write call
    partial: float = 0.0  # per pipe_file
    latency: float = 0.0  # per call
    max_latency_s: float = 0.005
    read_faults: bool = True  # transient faults on reads too
    max_consecutive: int = 2
    capacity_bytes: int | None = None  # ENOSPC once this many bytes were written (None: unlimited)
    down: bool = False
    outages: list = field(default_factory=list)  # [(first call, end call)): every call in between fails
    injected: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)
    written_bytes: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._recent: dict[int, deque] = {}

    def __repr__(self) -> str:  # fsspec tokenizes storage options: keep it short and stable
        return f"FaultPlan(seed={self.seed}, id={id(self):x})"

    def _roll(self, p: float) -> bool:
        return p > 0 and self._rng.random() < p

    def before(self, op: str, path: str, nbytes: int = 0) -> str | None:
        """Raise the fault chosen for this call, or return ``"partial"``/``"ghost"``/None."""
        with self._lock:
            n = sum(self.calls.values())
            self.calls[op] += 1
            if self.down or any(a <= n < b for a, b in self.outages):
                self.injected["down"] += 1
                raise ConnectionRefusedError(errno.ECONNREFUSED, f"injected: backend down ({op} {path})")
            delay = self._rng.uniform(0, self.max_latency_s) if self._roll(self.latency) else 0.0
            if delay:
                self.injected["latency"] += 1
            # At most max_consecutive faulty calls among the last FAULT_WINDOW calls of a thread:
            # a storage call's attempt makes at most three filesystem calls, so the
            # (max_consecutive + 1)-th attempt of any storage call always gets through.
            recent = self._recent.setdefault(threading.get_ident(), deque(maxlen=FAULT_WINDOW))
            allowed = sum(recent) < self.max_consecutive
            fail = allowed and (op in WRITE_OPS or self.read_faults) and self._roll(self.transient)
            after = None
            if fail:
                self.injected["transient"] += 1
                kind = self._rng.choice((TimeoutError, ConnectionResetError, "eio"))
            elif op == "pipe_file" and self.capacity_bytes is not None \
                    and self.written_bytes + nbytes > self.capacity_bytes:
                self.injected["enospc"] += 1
                raise OSError(errno.ENOSPC, f"injected: no space left on device ({path})")
            elif allowed and op == "pipe_file" and nbytes > 1 and self._roll(self.partial):
                self.injected["partial"] += 1
                after = "partial"
            elif allowed and op in WRITE_OPS and self._roll(self.ghost):
                self.injected["ghost"] += 1
                after = "ghost"
            recent.append(bool(fail or after))
            if op == "pipe_file" and not fail:
                self.written_bytes += nbytes
            cut = self._rng.randrange(1, nbytes) if after == "partial" else 0
        if delay:
            time.sleep(delay)
        if fail:
            if kind == "eio":
                raise OSError(errno.EIO, f"injected: I/O error ({op} {path})")
            raise kind(f"injected: {kind.__name__} ({op} {path})")
        if after == "partial":
            return f"partial:{cut}"
        return after

    @property
    def total(self) -> int:
        return sum(self.injected.values())


class _UploadFile(io.BytesIO):
    """``open(path, "wb")``: buffered, uploaded in one ``pipe_file`` on close (as object stores do)."""

    def __init__(self, fs: FaultyFileSystem, path: str) -> None:
        super().__init__()
        self._fs, self._path = fs, path

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            self._fs.pipe_file(self._path, data)


class FaultyFileSystem(AbstractFileSystem):
    protocol = PROTOCOL
    root_marker = ""
    cachable = False

    def __init__(self, *, target_protocol: str = "file", target_options: dict | None = None,
                 faults: FaultPlan | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fs = fsspec.filesystem(target_protocol, **(target_options or {}))
        self.plan = faults or FaultPlan()

    # -- writes ---------------------------------------------------------------------------------

    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> None:
        value = bytes(value)
        after = self.plan.before("pipe_file", path, len(value))
        if after and after.startswith("partial:"):
            self.fs.pipe_file(path, value[: int(after.split(":")[1])])
            raise DroppedConnection(f"injected: connection dropped mid-upload of {path}")
        self.fs.pipe_file(path, value, **kwargs)
        if after == "ghost":
            raise TimeoutError(f"injected: no response after writing {path}")

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "w" in mode:
            return _UploadFile(self, path)
        return io.BytesIO(self.cat_file(path))

    def mv(self, path1: str, path2: str, **kwargs: Any) -> None:
        after = self.plan.before("mv", path2)
        self.fs.mv(path1, path2, **kwargs)
        if after == "ghost":
            raise TimeoutError(f"injected: no response after moving {path1} to {path2}")

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.plan.before("makedirs", path)
        self.fs.makedirs(path, exist_ok=exist_ok)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.makedirs(path, exist_ok=True)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        after = self.plan.before("rm", str(path))
        self.fs.rm(path, recursive=recursive, maxdepth=maxdepth)
        if after == "ghost":
            raise TimeoutError(f"injected: no response after removing {path}")

    # -- reads ----------------------------------------------------------------------------------

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        self.plan.before("cat_file", path)
        return self.fs.cat_file(path, start=start, end=end, **kwargs)

    def info(self, path: str, **kwargs: Any) -> dict:
        self.plan.before("info", path)
        return self.fs.info(path, **kwargs)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        self.plan.before("ls", path)
        return self.fs.ls(path, detail=detail, **kwargs)

    def find(self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False,
             **kwargs: Any) -> Any:
        self.plan.before("find", path)
        return self.fs.find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)


fsspec.register_implementation(PROTOCOL, FaultyFileSystem, clobber=True)


def faulty_url(path: Any) -> str:
    return f"{PROTOCOL}://{path}"
