"""Mapping between torch dtypes and zarr v3 data type names.

Tensors are stored as their raw little-endian bytes, so every dtype round-trips bit-exactly.
Where an independent zarr v3 reader knows a dtype by name we write that name: the core zarr
v3 types, plus ``bfloat16`` and the float8 types that tensorstore reads natively (zarr-python
reads them after :func:`ckpt.zarr_compat.register_zarr_dtypes`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .errors import LayoutError

if sys.byteorder != "little":  # pragma: no cover - no big-endian host runs torch training today
    raise ImportError("ckpt stores raw little-endian bytes and needs a little-endian host")


@dataclass(frozen=True, slots=True)
class DTypeInfo:
    torch_dtype: torch.dtype
    name: str  # torch name, used in the manifest
    zarr_name: str  # zarr v3 data_type
    itemsize: int
    fill_value: bool | int | float


def _info(dt: torch.dtype, zarr_name: str | None = None) -> DTypeInfo:
    name = str(dt).removeprefix("torch.")
    if dt == torch.bool:
        fill: bool | int | float = False
    elif dt.is_floating_point or dt.is_complex:
        fill = 0.0
    else:
        fill = 0
    if dt.is_complex:
        fill = [0.0, 0.0]  # type: ignore[assignment]
    return DTypeInfo(dt, name, zarr_name or name, torch.empty((), dtype=dt).element_size(), fill)


_TABLE = [
    _info(torch.bool),
    _info(torch.uint8),
    _info(torch.int8),
    _info(torch.int16),
    _info(torch.int32),
    _info(torch.int64),
    _info(torch.uint16),
    _info(torch.uint32),
    _info(torch.uint64),
    _info(torch.float16),
    _info(torch.float32),
    _info(torch.float64),
    _info(torch.bfloat16),
    _info(torch.float8_e4m3fn),
    _info(torch.float8_e5m2),
    _info(torch.float8_e4m3fnuz),
    _info(torch.float8_e5m2fnuz),
    _info(torch.complex64),
    _info(torch.complex128),
]
_BY_TORCH = {i.torch_dtype: i for i in _TABLE}
_BY_NAME = {i.name: i for i in _TABLE}


def info_of(dtype: torch.dtype) -> DTypeInfo:
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise LayoutError(
            f"dtype {dtype} cannot be stored; supported: {', '.join(sorted(_BY_NAME))}"
        ) from None


def name_of(dtype: torch.dtype) -> str:
    """The manifest's name of ``dtype`` (``float32``), also for a dtype that cannot be stored."""
    info = _BY_TORCH.get(dtype)
    return info.name if info is not None else str(dtype).removeprefix("torch.")


def info_by_name(name: str) -> DTypeInfo:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise LayoutError(f"unknown dtype {name!r} in checkpoint; upgrade ckpt to read it") from None


def codecs_for(info: DTypeInfo) -> list[dict]:
    """The codec chain of every array: raw bytes, then a crc32c checksum of them."""
    if info.itemsize == 1:
        return [{"name": "bytes"}, {"name": "crc32c"}]
    return [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
