"""The chunk codec: how one chunk's bytes are stored, and how they are checked on read.

A stored chunk is the raw little-endian bytes of its region, full chunk size even at a ragged
edge (zarr fills the part outside the array), followed by the crc32c of those bytes (zarr v3's
``bytes`` + ``crc32c`` codecs). Every writer (io, reshard, the agent) encodes through
:func:`encode`, every reader (io, verify, the agent's memory tier) decodes through
:func:`read_chunk` and judges with :func:`check`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import crc32c
import torch

from .storage import Storage

CRC_BYTES = 4


def as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def payload(tensor: torch.Tensor, slices: tuple[slice, ...], chunk_shape: Sequence[int], *,
            ragged: bool) -> tuple[memoryview, torch.Tensor]:
    """The stored bytes of the chunk ``tensor[slices]`` (without checksum), and the tensor that
    owns them (keep it alive while the bytes are used). A contiguous full chunk of a CPU tensor
    is not copied."""
    region = tensor.detach()[slices]
    if region.device.type != "cpu":
        region = region.cpu()
    if ragged:
        padded = torch.zeros(tuple(chunk_shape), dtype=region.dtype)
        padded[tuple(slice(0, s.stop - s.start) for s in slices)] = region
        region = padded
    elif not region.is_contiguous():
        region = region.contiguous()
    return as_bytes(region), region


def stored_view(tensor: torch.Tensor, slices: tuple[slice, ...], *, ragged: bool) -> tuple[memoryview, torch.Tensor] | None:
    """What :func:`payload` returns, where that is a view of ``tensor``'s memory (a CPU tensor,
    the region contiguous and not padded): found once, it stays right while the memory lives.
    None where the stored bytes would be a copy."""
    if ragged or tensor.device.type != "cpu":
        return None
    region = tensor.detach()[slices]
    return (as_bytes(region), region) if region.is_contiguous() else None


def encode(data: memoryview) -> tuple[list[Any], int]:
    """The parts to store for ``data`` (the data, then its crc32c), and the crc32c."""
    crc = crc32c.crc32c(data)
    return [data, crc.to_bytes(CRC_BYTES, "little")], crc


def stored_nbytes(chunk_shape: Sequence[int], itemsize: int) -> int:
    """A chunk's data bytes as stored (full chunk size), without the checksum."""
    n = itemsize
    for s in chunk_shape:
        n *= s
    return n


class ChunkRead(NamedTuple):
    """What one read of a chunk found: its total stored size, the crc32c stored after the data,
    and the crc32c of the data actually read."""

    total: int
    stored_crc: int
    actual_crc: int


def read_chunk(storage: Storage, path: str, data: memoryview, *, offset: int | None = None) -> ChunkRead:
    """Fill ``data`` with the chunk's bytes; the checksum is computed piece by piece as they land.

    ``offset`` None: the chunk is the whole object ``path`` (its total size is checked);
    otherwise it sits at ``offset`` inside ``path`` (a pack or a shard). ``FileNotFoundError``
    if absent, ``EOFError`` if shorter than ``data`` plus its checksum."""
    tail = bytearray(CRC_BYTES)
    state = {"crc": 0, "seen": False}

    def on_piece(i: int, off: int, piece: memoryview) -> None:
        if i == 0:
            state["crc"] = crc32c.crc32c(piece, state["crc"] if off else 0)
            state["seen"] = True

    if offset is None:
        total = storage.read_into(path, [data, memoryview(tail)], on_piece=on_piece)
    else:
        storage.read_range_into(path, offset, [data, memoryview(tail)], on_piece=on_piece)
        total = data.nbytes + CRC_BYTES
    actual = state["crc"] if state["seen"] or not data.nbytes else crc32c.crc32c(data)
    return ChunkRead(total, int.from_bytes(tail, "little"), actual)


def check(read: ChunkRead, nbytes: int, *, recorded_crc: int | None = None) -> str | None:
    """What is wrong with a chunk of ``nbytes`` data bytes read as ``read`` (None: nothing)."""
    if read.total != nbytes + CRC_BYTES:
        return f"{read.total} bytes, expected {nbytes + CRC_BYTES}"
    if read.actual_crc != read.stored_crc:
        return f"checksum mismatch (stored {read.stored_crc:#010x}, data {read.actual_crc:#010x})"
    if recorded_crc is not None and read.stored_crc != recorded_crc:
        return f"not the chunk its writer recorded (crc {read.stored_crc:#010x}, recorded {recorded_crc:#010x})"
    return None
