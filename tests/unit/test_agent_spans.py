"""Chunks read out of a segment by offset (``agent.trainer.spans``): many side by side with one
``preadv``, gaps skipped, large ones in blocks, a segment shorter than its index found per chunk."""

from __future__ import annotations

import os

import crc32c
import pytest

from agent.trainer import spans


@pytest.fixture
def segment(tmp_path):
    data = os.urandom(3 << 20)
    path = tmp_path / "seg"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


def _read(fd, wanted):
    dests = [(off, memoryview(bytearray(n))) for off, n in wanted]
    return dests, spans.pread_many(fd, dests)


def test_side_by_side_gapped_far_apart_and_large_chunks_are_read_exactly(segment, monkeypatch):
    fd, data = segment
    calls = []
    real = os.preadv
    monkeypatch.setattr(spans.os, "preadv", lambda f, bufs, off: calls.append(len(bufs)) or real(f, bufs, off))
    wanted = [(256 * i, 256) for i in range(300)]  # 300 chunks side by side
    wanted += [(100_000 + 300 * i, 256) for i in range(10)]  # 44-byte gaps between them
    wanted += [(2_000_000, 512)]  # far from the others
    wanted += [(1 << 20, (1 << 20) + 7)]  # a large chunk: in blocks
    order = list(reversed(wanted))  # any order in, results in that order
    dests, crcs = _read(fd, order)
    for (off, dest), crc in zip(dests, crcs):
        assert bytes(dest) == data[off: off + dest.nbytes]
        assert crc == crc32c.crc32c(data[off: off + dest.nbytes])
    # the 300 side by side in one call, the 10 gapped in one, the far one and the large one alone
    assert len(calls) <= 6 and max(calls) >= 300


def test_more_buffers_than_one_call_takes_are_split(segment, monkeypatch):
    fd, data = segment
    monkeypatch.setattr(spans, "IOV_MAX", 16)
    dests, crcs = _read(fd, [(64 * i, 64) for i in range(100)])
    assert all(bytes(d) == data[o: o + 64] and c == crc32c.crc32c(data[o: o + 64]) for (o, d), c in zip(dests, crcs))


def test_chunks_past_the_segment_end_are_none_the_others_read(segment):
    fd, data = segment
    end = len(data)
    _dests, crcs = _read(fd, [(end - 512, 256), (end - 256, 256), (end, 256), (end + 1024, 64)])
    assert crcs[0] == crc32c.crc32c(data[end - 512: end - 256]) and crcs[1] == crc32c.crc32c(data[end - 256:])
    assert crcs[2] is None and crcs[3] is None
    assert spans.pread_crc(fd, end - 8, memoryview(bytearray(16))) is None
