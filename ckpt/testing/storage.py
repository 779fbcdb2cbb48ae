"""The storage conformance suite: what every ``ckpt.Storage`` must do.

```python
from ckpt.testing.storage import StorageTests

class TestMyStorage(StorageTests):
    def make(self, tmp_path):
        return MyStorage(...)
```
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ..errors import StorageError
from ..storage import Storage


class StorageTests:
    """Subclass in a pytest module and implement :meth:`make`; every ``test_*`` method then runs
    against your storage."""

    def make(self, tmp_path: Any) -> Storage:
        raise NotImplementedError

    def test_write_read_size(self, tmp_path):
        s = self.make(tmp_path)
        s.write("a/b/c.bin", [b"hello ", memoryview(b"world")])
        assert s.read("a/b/c.bin") == b"hello world"
        assert s.size("a/b/c.bin") == 11
        assert s.size("a/nope") is None
        assert s.exists("a/b/c.bin") and not s.exists("a/b/d")

    def test_read_into_buffers_and_short_objects(self, tmp_path):
        s = self.make(tmp_path)
        s.write("x", [bytes(range(10))])
        a, b = bytearray(6), bytearray(4)
        assert s.read_into("x", [memoryview(a), memoryview(b)]) == 10
        assert bytes(a) == bytes(range(6)) and bytes(b) == bytes(range(6, 10))
        with pytest.raises(EOFError):
            s.read_into("x", [memoryview(bytearray(11))])
        with pytest.raises(FileNotFoundError):
            s.read_into("missing", [memoryview(bytearray(1))])
        with pytest.raises(FileNotFoundError):
            s.read("missing")

    def test_atomic_write_replaces(self, tmp_path):
        s = self.make(tmp_path)
        s.write_atomic("d/zarr.json", b"1")
        s.write_atomic("d/zarr.json", b"22")
        assert s.read("d/zarr.json") == b"22"
        assert s.list_dir("d") == ["zarr.json"]  # no temp files left

    def test_list_walk_delete(self, tmp_path):
        s = self.make(tmp_path)
        for p in ("000000000001/a/c/0", "000000000001/zarr.json", "000000000002/x"):
            s.write(p, [b"abc"])
        assert s.list_dir("") == ["000000000001", "000000000002"]
        assert s.walk("000000000001") == {"a/c/0": 3, "zarr.json": 3}
        assert s.walk("nothing") == {} and s.list_dir("nothing") == []
        s.delete("000000000001", recursive=True)
        assert s.list_dir("") == ["000000000002"]
        s.delete("000000000002/x")
        s.delete("never/was")

    def test_large_aligned_writes_and_the_sync_barrier(self, tmp_path):
        # A page-aligned body of a few MiB plus an unaligned tail and a checksum: the shape of
        # a chunk written from a host slab (LocalStorage takes its O_DIRECT path for it).
        s = self.make(tmp_path)
        from ckpt.hostpool import PrivateAllocator

        buf, _ = PrivateAllocator().allocate(3 * 2**20 + 100, pin_memory=False)
        buf.copy_(torch.randint(0, 256, buf.shape, dtype=torch.uint8))
        body = memoryview(buf.numpy())
        s.write("big/0", [body, b"\x01\x02\x03\x04"], durable=not s.can_sync)
        s.write("big/1", [body[1:]], durable=not s.can_sync)  # unaligned start: buffered
        if s.can_sync:
            s.sync(["big/0", "big/1"])
        assert s.read("big/0") == bytes(body) + b"\x01\x02\x03\x04"
        assert s.read("big/1") == bytes(body[1:])

    def test_read_into_reports_every_piece_in_order(self, tmp_path):
        """``on_piece`` sees every byte of every buffer exactly once, in order (a retried read
        starts again at offset 0)."""
        s = self.make(tmp_path)
        body = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4: several pieces on a piecewise reader
        s.write("p", [body])
        a, b = bytearray(len(body) - 4), bytearray(4)
        seen: dict[int, bytearray] = {0: bytearray(), 1: bytearray()}

        def on_piece(i: int, offset: int, piece: memoryview) -> None:
            if offset == 0:
                seen[i] = bytearray()
            assert offset == len(seen[i])
            seen[i] += bytes(piece)

        assert s.read_into("p", [memoryview(a), memoryview(b)], on_piece=on_piece) == len(body)
        assert bytes(seen[0]) == body[:-4] == bytes(a) and bytes(seen[1]) == b"tail" == bytes(b)

    def test_read_range_into_reads_a_part_of_an_object(self, tmp_path):
        s = self.make(tmp_path)
        body = bytes(range(256)) * 2048
        s.write("r", [body])
        a, b = bytearray(1000), bytearray(24)
        s.read_range_into("r", 4096, [memoryview(a), memoryview(b)])
        assert bytes(a) == body[4096:5096] and bytes(b) == body[5096:5120]
        pieces: list[int] = []
        s.read_range_into("r", 7, [memoryview(bytearray(300_000))], on_piece=lambda i, off, p: pieces.append(p.nbytes))
        assert sum(pieces) == 300_000
        with pytest.raises(EOFError):
            s.read_range_into("r", len(body) - 10, [memoryview(bytearray(11))])
        with pytest.raises(FileNotFoundError):
            s.read_range_into("missing", 0, [memoryview(bytearray(1))])

    def test_detached_delete_is_gone_from_listings(self, tmp_path):
        s = self.make(tmp_path)
        for i in range(5):
            s.write(f"000000000001/a/c.{i}", [b"x"])
        s.write("000000000002/zarr.json", [b"{}"])
        s.delete_detached("000000000001")
        assert not s.exists("000000000001/a/c.0")
        assert "000000000001" not in s.list_dir("")
        s.delete_detached("never/was")

    def test_sync_barrier_matches_the_capability(self, tmp_path):
        s = self.make(tmp_path)
        s.write("s/0", [b"abc"], durable=False)
        if s.can_sync:
            s.sync(["s/0"])
        else:
            with pytest.raises(NotImplementedError):
                s.sync(["s/0"])
        assert s.read("s/0") == b"abc"

    def test_walk_times_gives_sizes_and_times(self, tmp_path):
        s = self.make(tmp_path)
        s.write("w/a", [b"12345"])
        s.write("w/b/c", [b"1"])
        times = s.walk_times("w")
        assert {k: v[0] for k, v in times.items()} == {"a": 5, "b/c": 1}
        assert all(t is None or t > 0 for _, t in times.values())

    def test_paths_cannot_escape(self, tmp_path):
        s = self.make(tmp_path)
        for bad in ("../x", "/etc/passwd", "a/../../x", "a//b", ""):
            with pytest.raises(StorageError):
                s.write(bad, [b"x"])
