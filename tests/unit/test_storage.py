"""Conformance tests every Storage implementation passes, and the retry behaviour."""

from __future__ import annotations

import errno
import mmap
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
    """Memory (tmpfs): no O_DIRECT, known from the mount table; every part gathered."""

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


def _parts(seed: int) -> list:
    """Small parts between large page-aligned ones, as a pack has them (data, crc, padding)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(40):
        n = (i % 3 + 1) * 256 * 1024 + i * 7
        big = memoryview(mmap.mmap(-1, n))  # page-aligned, as a slab's chunks are
        big[:] = torch.randint(0, 255, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()
        out += [big, bytes([i]) * 4, bytes(i % 5)]
    return out


@pytest.mark.parametrize("root", ["tmp", "shm"])
def test_local_write_of_many_parts_gathers_them_and_keeps_their_order(tmp_path, root, monkeypatch):
    base = tmp_path if root == "tmp" else tempfile.mkdtemp(dir="/dev/shm") if os.path.isdir("/dev/shm") else None
    if base is None:
        pytest.skip("no /dev/shm")
    try:
        st = LocalStorage(str(base))
        calls = {"pwritev": 0}
        real = os.pwritev

        def short_pwritev(fd, views, at):  # a short write now and then: the rest follows
            calls["pwritev"] += 1
            return real(fd, views[:1] if calls["pwritev"] % 3 == 0 and len(views) > 1 else views, at)

        monkeypatch.setattr(os, "pwritev", short_pwritev)
        parts = _parts(1)
        st.write("f.bin", parts)
        assert st.read("f.bin") == b"".join(bytes(p) for p in parts)
        assert calls["pwritev"] < len(parts) // 2  # gathered, not one call per part

        reused = bytearray(300 * 1024)  # a generator that refills one buffer

        def gen():
            for i in range(5):
                reused[:] = bytes([i]) * len(reused)
                yield reused
        st.write("g.bin", gen())
        assert st.read("g.bin") == b"".join(bytes([i]) * len(reused) for i in range(5))
    finally:
        if root == "shm":
            shutil.rmtree(base, ignore_errors=True)


def test_local_write_falls_back_to_buffered_where_direct_io_is_refused(tmp_path, monkeypatch):
    st = LocalStorage(str(tmp_path))
    if not st.direct_io:
        pytest.skip("no O_DIRECT here")
    if os.path.isdir("/dev/shm"):
        assert not LocalStorage("/dev/shm/x").direct_io  # memory: no O_DIRECT, from the mount table
    real, refused = os.pwrite, []

    def pwrite(fd, data, at):
        if not refused:  # the first write is the direct one: alignment refused
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, at)

    monkeypatch.setattr(os, "pwrite", pwrite)
    parts = _parts(2)
    st.write("f.bin", parts)
    assert refused and not st.direct_io
    assert st.read("f.bin") == b"".join(bytes(p) for p in parts)
