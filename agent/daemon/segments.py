"""The agent's POSIX shared-memory segments: naming, making, removing; trainers map them.

A segment is a file under ``/dev/shm`` named ``<prefix>.<agent pid>.<instance>.<n>``: the pid
lets a starting agent remove the segments of agents that died without cleaning up (a crashed
or killed agent leaves its segments behind; their memory stays used until they are unlinked).
Space is reserved with ``posix_fallocate`` when a segment is made, so a full ``/dev/shm``
is an error at lease time rather than a SIGBUS in the middle of a copy.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import threading
from dataclasses import dataclass, field

import torch

from ..errors import AgentBudgetError
from ..shm import map_file


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def parse_name(name: str, prefix: str) -> int | None:
    """The owning agent's pid of a segment name of this prefix, or None."""
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != prefix or not parts[1].isdigit():
        return None
    return int(parts[1])


def cleanup_stale(shm_dir: str, prefix: str) -> list[str]:
    """Unlink the segments of ``prefix`` whose agent process is gone; returns their names."""
    removed = []
    try:
        names = os.listdir(shm_dir)
    except FileNotFoundError:
        return removed
    for name in names:
        pid = parse_name(name, prefix)
        if pid is None or pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


@dataclass(eq=False)
class Segment:
    """One segment as mapped by the agent."""

    name: str
    nbytes: int
    path: str
    mm: mmap.mmap | None = field(default=None, repr=False)
    tensor: torch.Tensor | None = field(default=None, repr=False)

    def close(self) -> None:
        self.tensor = None
        self.mm = None  # unmapped now, or by the last tensor still viewing it (agent.shm.map_file)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class SegmentFactory:
    """Makes this agent's segments and removes them all at exit."""

    def __init__(self, shm_dir: str, prefix: str, mode: int = 0o600) -> None:
        self.shm_dir = shm_dir
        self.prefix = prefix
        self.mode = mode
        self.instance = secrets.token_hex(4)
        self._n = 0
        self._lock = threading.Lock()
        self._live: dict[str, Segment] = {}

    def create(self, nbytes: int) -> Segment:
        with self._lock:
            self._n += 1
            name = f"{self.prefix}.{os.getpid()}.{self.instance}.{self._n}"
        path = os.path.join(self.shm_dir, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, self.mode)
        try:
            os.fchmod(fd, self.mode)  # not narrowed by the umask
            if nbytes:
                try:
                    os.posix_fallocate(fd, 0, nbytes)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                        raise AgentBudgetError(
                            f"{self.shm_dir} has no room for a {nbytes / 2**20:.1f} MiB segment; "
                            "enlarge it (mount size / pod emptyDir sizeLimit) or lower the budget"
                        ) from None
                    raise
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        try:
            mm, tensor = map_file(path, nbytes, writable=True)
        except BaseException:
            os.unlink(path)
            raise
        seg = Segment(name, nbytes, path, mm, tensor)
        with self._lock:
            self._live[name] = seg
        return seg

    def destroy(self, seg: Segment) -> None:
        with self._lock:
            self._live.pop(seg.name, None)
        seg.close()

    def destroy_all(self) -> None:
        with self._lock:
            segs = list(self._live.values())
            self._live.clear()
        for s in segs:
            s.close()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._live)
