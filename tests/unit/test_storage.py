"""Conformance tests every Storage implementation passes, and the retry behaviour."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

import fsspec
import pytest
import torch

from ckpt import StorageError
from ckpt.storage import FsspecStorage, LocalStorage, RetryingStorage, RetryPolicy, Storage, is_transient, open_storage
from ckpt.testing.storage import StorageTests
from tests.helpers import DelegatingStorage


class TestLocal(StorageTests):
    def make(self, tmp_path):
        return LocalStorage(str(tmp_path))


class TestLocalOnTmpfs(StorageTests):
    """A filesystem without O_DIRECT: the first large write finds out and falls back."""

    def make(self, tmp_path):
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm")
        root = tempfile.mkdtemp(dir="/dev/shm", prefix="ckpt-test-")
        self._cleanup = root
        return LocalStorage(root)

    def teardown_method(self):
        if getattr(self, "_cleanup", None):
            shutil.rmtree(self._cleanup, ignore_errors=True)


class TestFsspecMemory(StorageTests):
    def make(self, tmp_path):
        fs = fsspec.filesystem("memory")
        root = f"/{tmp_path.name}"
        return FsspecStorage(fs, root, f"memory://{root}")


class TestFsspecLocal(StorageTests):
    """fsspec's local filesystem takes the rename path of write_atomic."""

    def make(self, tmp_path):
        return FsspecStorage(fsspec.filesystem("file"), str(tmp_path), f"file://{tmp_path}")


class TestRetrying(StorageTests):
    def make(self, tmp_path):
        return RetryingStorage(LocalStorage(str(tmp_path)), RetryPolicy(attempts=2, initial_backoff_s=0.0, max_backoff_s=0.0))


class Flaky(DelegatingStorage):
    """Fails the first ``failures`` writes with ``exc``."""

    def __init__(self, inner: Storage, failures: int, exc: BaseException):
        super().__init__(inner)
        self.failures, self.exc, self.calls = failures, exc, 0

    def write(self, path, parts, *, durable=True):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        self.inner.write(path, parts, durable=durable)

    def write_atomic(self, path, data):
        self.write(path, [data])


FAST = RetryPolicy(attempts=4, initial_backoff_s=0.0, max_backoff_s=0.0)


@pytest.mark.parametrize("exc", [TimeoutError("slow"), ConnectionResetError("reset"), OSError(errno.EIO, "io")])
def test_transient_errors_are_retried(tmp_path, exc):
    flaky = Flaky(LocalStorage(str(tmp_path)), failures=3, exc=exc)
    RetryingStorage(flaky, FAST).write("a", [b"x"])
    assert flaky.calls == 4 and (tmp_path / "a").read_bytes() == b"x"


def test_transient_errors_give_up_with_a_storage_error(tmp_path):
    flaky = Flaky(LocalStorage(str(tmp_path)), failures=10, exc=TimeoutError("slow"))
    with pytest.raises(StorageError, match="after 4 attempts"):
        RetryingStorage(flaky, FAST).write("a", [b"x"])
    assert flaky.calls == 4


@pytest.mark.parametrize("exc", [PermissionError("no"), OSError(errno.ENOSPC, "full"), FileNotFoundError("gone")])
def test_permanent_errors_are_raised_at_once(tmp_path, exc):
    flaky = Flaky(LocalStorage(str(tmp_path)), failures=10, exc=exc)
    with pytest.raises(type(exc)):
        RetryingStorage(flaky, FAST).write("a", [b"x"])
    assert flaky.calls == 1 and not is_transient(exc)


def test_open_storage_by_url(tmp_path):
    assert isinstance(open_storage(str(tmp_path)), RetryingStorage)
    assert open_storage(f"file://{tmp_path}").url == f"file://{tmp_path}"
    assert open_storage("memory://bucket/run").url == "memory://bucket/run"
    with pytest.raises(StorageError, match="unknown URL scheme"):
        open_storage("bogus://x")
    with pytest.raises(StorageError):
        open_storage("")


def test_local_detached_delete_renames_at_once_and_deletes_in_the_background(tmp_path):
    import time

    from ckpt.storage import TRASH_PREFIX

    s = LocalStorage(str(tmp_path))
    for i in range(50):
        s.write(f"000000000001/a/c.{i}", [b"x" * 100])
    s.write("000000000002/zarr.json", [b"{}"])
    s.delete_detached("000000000001")
    assert not s.exists("000000000001/a/c.0")
    assert all(n.startswith(TRASH_PREFIX) or n == "000000000002" for n in s.list_dir(""))
    for _ in range(200):  # the background process finishes (no time asserted, only the end state)
        if s.list_dir("") == ["000000000002"]:
            break
        time.sleep(0.05)
    assert s.list_dir("") == ["000000000002"]
    s.delete_detached("never/was")  # absent: fine


def test_gc_removes_trash_left_by_a_crash(tmp_path):
    import ckpt
    from ckpt.retention import RetentionPolicy, run_gc

    ckpt.save({"w": torch.ones(3)}, str(tmp_path), step=1)
    (tmp_path / ".trash-000000000000-dead").mkdir()
    (tmp_path / ".trash-000000000000-dead" / "f").write_bytes(b"x")
    st = LocalStorage(str(tmp_path))
    run_gc(st, RetentionPolicy(keep_last=1), clean_trash=False)
    assert (tmp_path / ".trash-000000000000-dead").exists()
    run_gc(st, RetentionPolicy(keep_last=1))
    assert sorted(os.listdir(tmp_path)) == ["000000000001"]
