"""Retries of transient storage errors (exponential backoff with jitter); permanent ones
(missing file, permission, no space) are raised at once."""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from ..errors import CkptError, StorageError
from .base import Buffer, OnPiece, Storage
from .wrapper import StorageWrapper

log = logging.getLogger(__name__)
T = TypeVar("T")

_PERMANENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM})
_TRANSIENT_NAME_HINTS = ("timeout", "throttl", "slowdown", "unavailable", "connection", "reset", "temporar")


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


class RetryingStorage(StorageWrapper):
    """Wraps a storage; retries transient errors, raises permanent ones at once."""

    def __init__(self, inner: Storage, policy: RetryPolicy) -> None:
        super().__init__(inner)
        self.policy = policy

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:  # the common case without building a retry loop (per call, it cost more than a read)
            return fn()
        except Exception as e:
            if not is_transient(e) or self.policy.attempts <= 1:
                return self._raise(what, e)
            log.warning("storage %s failed (attempt 1/%d), retrying: %s", what, self.policy.attempts, e)
        return self._retry(what, fn)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.policy.attempts - 1),
            wait=tenacity.wait_random_exponential(
                multiplier=self.policy.initial_backoff_s, max=self.policy.max_backoff_s
            ),
            retry=tenacity.retry_if_exception(is_transient),
            before_sleep=lambda rs: log.warning(
                "storage %s failed (attempt %d/%d), retrying: %s",
                what, rs.attempt_number + 1, self.policy.attempts, rs.outcome.exception() if rs.outcome else "",
            ),
            reraise=True,
        )
        time.sleep(min(self.policy.max_backoff_s, self.policy.initial_backoff_s * random.random()))
        try:
            return retrying(fn)
        except Exception as e:
            return self._raise(what, e)

    def _raise(self, what: str, e: Exception) -> T:
        if is_transient(e):
            raise StorageError(f"storage {what} on {self.url} failed after {self.policy.attempts} attempts: {e}") from e
        if not isinstance(e, (CkptError, OSError, EOFError, ValueError, TypeError)):
            # A filesystem client's own error (botocore's NoCredentialsError, ...): callers
            # catch StorageError, not every backend's exception hierarchy.
            raise StorageError(f"storage {what} on {self.url} failed: {type(e).__name__}: {e}") from e
        raise e

    def write(self, path: str, parts: Iterable[Buffer], *, durable: bool = True) -> None:
        self._call(f"write {path}", lambda: self.inner.write(path, parts, durable=durable))

    def write_atomic(self, path: str, data: bytes) -> None:
        self._call(f"write {path}", lambda: self.inner.write_atomic(path, data))

    def sync(self, paths: Sequence[str]) -> None:
        self._call("sync", lambda: self.inner.sync(paths))

    def delete_detached(self, path: str) -> None:
        self._call(f"delete {path}", lambda: self.inner.delete_detached(path))

    def read(self, path: str) -> bytes:
        return self._call(f"read {path}", lambda: self.inner.read(path))

    def read_into(self, path: str, buffers: Sequence[memoryview], *, on_piece: OnPiece | None = None) -> int:
        return self._call(f"read {path}", lambda: self.inner.read_into(path, buffers, on_piece=on_piece))

    def read_range_into(self, path: str, offset: int, buffers: Sequence[memoryview], *,
                        on_piece: OnPiece | None = None) -> None:
        self._call(f"read {path}", lambda: self.inner.read_range_into(path, offset, buffers, on_piece=on_piece))

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

    def exists(self, path: str) -> bool:
        return self.size(path) is not None
