"""ReadAhead: small ranged reads of one object served from a few large reads, byte for byte the
same as reading each range, with the same errors for missing and short objects."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from ckpt.readahead import ReadAhead
from ckpt.storage import LocalStorage
from tests.helpers import DelegatingStorage


class _Counting(DelegatingStorage):
    def __init__(self, inner):
        super().__init__(inner)
        self.ranged: list[tuple[str, int, int]] = []
        self.sizes = 0

    def read_range_into(self, path, offset, buffers, *, on_piece=None):
        self.ranged.append((path, offset, sum(b.nbytes for b in buffers)))
        return self.inner.read_range_into(path, offset, buffers, on_piece=on_piece)

    def size(self, path):
        self.sizes += 1
        return self.inner.size(path)


@pytest.fixture
def pack(tmp_path):
    storage = LocalStorage(str(tmp_path))
    data = bytes(range(256)) * 4096  # 1 MiB
    storage.write("p/pack.0", [data])
    return storage, data


def _read(storage, path, offset, n, split=None):
    a, b = bytearray(split or n), bytearray(n - (split or n))
    pieces = []
    bufs = [memoryview(a)] + ([memoryview(b)] if split else [])
    storage.read_range_into(path, offset, bufs, on_piece=lambda i, off, v: pieces.append((i, bytes(v))))
    return bytes(a) + bytes(b), pieces


def test_small_reads_come_from_one_block_and_match_the_object(pack):
    storage, data = pack
    counted = _Counting(storage)
    ra = ReadAhead(counted, window=256 << 10, small=64 << 10)
    offsets = list(range(0, 200_000, 1_000))
    for off in offsets:
        got, pieces = _read(ra, "p/pack.0", off, 996, split=900)
        assert got == data[off: off + 996]
        assert pieces == [(0, data[off: off + 900]), (1, data[off + 900: off + 996])]  # every piece, in order
    assert counted.sizes == 1 and len(counted.ranged) == 1  # one HEAD, one read of 256 KiB
    assert counted.ranged[0] == ("p/pack.0", 0, 256 << 10)
    assert ra.block_reads == 1 and ra.served == len(offsets)


def test_blocks_stop_at_the_end_large_reads_pass_through_and_errors_are_the_same(pack):
    storage, data = pack
    counted = _Counting(storage)
    ra = ReadAhead(counted, window=512 << 10, small=64 << 10)
    end = len(data)
    got, _ = _read(ra, "p/pack.0", end - 1000, 1000)
    assert got == data[-1000:] and counted.ranged[-1] == ("p/pack.0", 512 << 10, 512 << 10)  # on its boundary
    got, _ = _read(ra, "p/pack.0", (512 << 10) - 100, 300)  # across a boundary: a block from its offset
    assert got == data[(512 << 10) - 100: (512 << 10) + 200]
    assert counted.ranged[-1] == ("p/pack.0", (512 << 10) - 100, 512 << 10)
    got, _ = _read(ra, "p/pack.0", 10, 100 << 10)  # large: read as asked
    assert got == data[10: 10 + (100 << 10)] and counted.ranged[-1] == ("p/pack.0", 10, 100 << 10)
    with pytest.raises(EOFError):
        _read(ra, "p/pack.0", end - 10, 100)  # a torn pack is still found short
    with pytest.raises(FileNotFoundError):
        _read(ra, "p/missing", 0, 100)
    with pytest.raises(FileNotFoundError):
        _read(ReadAhead(storage), "p/missing", 0, 1 << 20)


def test_threads_share_blocks_and_memory_stays_bounded(pack):
    storage, data = pack
    counted = _Counting(storage)
    ra = ReadAhead(counted, window=64 << 10, small=16 << 10, max_blocks=4)
    offsets = [i * 3_000 for i in range(340)]  # the whole MiB, in 3 KB chunks

    def read(off):
        n = min(3_000, len(data) - off)
        return _read(ra, "p/pack.0", off, n)[0] == data[off: off + n]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(read, offsets))
    assert len(ra._blocks) <= 4
    assert len(counted.ranged) < 40  # about 1 MiB / 64 KiB blocks, not one read per chunk


def test_threads_starting_anywhere_in_a_window_share_its_one_block(pack):
    storage, data = pack
    counted = _Counting(storage)
    ra = ReadAhead(counted, window=1 << 20, small=64 << 10)
    offsets = [((i * 7919) % 250) * 4000 for i in range(64)]  # all over the object, in no order

    def read(off):
        return _read(ra, "p/pack.0", off, 3000)[0] == data[off: off + 3000]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(read, offsets))
    assert counted.sizes == 1 and len(counted.ranged) == 1
