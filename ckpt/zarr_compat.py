"""Teach zarr-python the ``bfloat16`` and float8 data types that our checkpoints use.

Our arrays name their data type ``"bfloat16"``, ``"float8_e4m3fn"`` or ``"float8_e5m2"``.
tensorstore reads these names natively, but zarr-python (3.1.x) does not know them: it refuses
to open such an array, and even a group whose consolidated metadata lists one. Call
:func:`register_zarr_dtypes` once before opening our checkpoints with zarr-python; arrays then
read as numpy arrays of the matching ``ml_dtypes`` dtype, bit-exactly, and zarr-python can also
write them (``zarr.create_array(..., dtype=ml_dtypes.bfloat16)``).

Nothing is registered on import: registering mutates zarr's global data type registry, so it
is done only when the function is called. This builds on zarr's ``ZDType`` interface
(``zarr.core.dtype``), which is public but young; it is tested with zarr 3.1.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self, SupportsFloat, SupportsIndex

import ml_dtypes
import numpy as np
from zarr.core.dtype import ZDType, data_type_registry
from zarr.core.dtype.common import DataTypeValidationError, HasEndianness, HasItemSize

__all__ = ["BFloat16", "Float8E4M3FN", "Float8E5M2", "register_zarr_dtypes"]

_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_NUMPY_BYTEORDER: dict[str, Literal["<", ">"]] = {"little": "<", "big": ">"}


@dataclass(frozen=True, kw_only=True)
class _MLDtypesFloat(ZDType[np.dtype[Any], Any], HasItemSize):
    """A zarr v3 data type backed by an ``ml_dtypes`` float scalar type (zarr v3 only)."""

    scalar_type: ClassVar[type[np.generic]]
    # unsigned integer dtype of the same width, for the hex ("0x...") fill value form
    _bits: ClassVar[np.dtype[Any]]

    @classmethod
    def from_native_dtype(cls, dtype: Any) -> Self:
        if cls._check_native_dtype(dtype):
            return cls()
        raise DataTypeValidationError(f"Invalid data type: {dtype}. Expected {cls.dtype_cls}")

    def to_native_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.scalar_type)

    @classmethod
    def _from_json_v2(cls, data: Any) -> Self:
        # zarr v2 has no name for these types (numpy calls them "<V2", "|V1", ...)
        raise DataTypeValidationError(f"{cls._zarr_v3_name} is only supported in zarr v3")

    @classmethod
    def _from_json_v3(cls, data: Any) -> Self:
        if data == cls._zarr_v3_name:
            return cls()
        raise DataTypeValidationError(f"Expected {cls._zarr_v3_name!r}, got {data!r}")

    def to_json(self, zarr_format: Literal[2, 3]) -> Any:
        if zarr_format == 3:
            return self._zarr_v3_name
        raise ValueError(f"{self._zarr_v3_name} is only supported in zarr v3")

    @property
    def item_size(self) -> int:
        return self._bits.itemsize

    def _check_scalar(self, data: object) -> bool:
        return isinstance(data, SupportsFloat | SupportsIndex) and not isinstance(data, str)

    def cast_scalar(self, data: object) -> Any:
        if isinstance(data, str):  # the JSON spellings: "NaN", "Infinity", "0x3f80", ...
            return self.from_json_scalar(data, zarr_format=3)
        if self._check_scalar(data):
            return self.scalar_type(data)  # type: ignore[call-arg]
        raise TypeError(f"Cannot convert {data!r} to a {self._zarr_v3_name} scalar")

    def default_scalar(self) -> Any:
        return self.scalar_type(0)  # type: ignore[call-arg]

    def from_json_scalar(self, data: Any, *, zarr_format: Literal[2, 3]) -> Any:
        if isinstance(data, int | float) and not isinstance(data, bool):
            return self.scalar_type(data)  # type: ignore[call-arg]
        if isinstance(data, str) and data in _SPECIAL_FLOATS:
            return self.scalar_type(_SPECIAL_FLOATS[data])  # type: ignore[call-arg]
        if isinstance(data, str) and data.startswith("0x") and len(data) == 2 + 2 * self.item_size:
            # zarr v3: the big-endian hex of the value's own bits, e.g. "0x3f80" is bfloat16 1.0
            bits = np.array(int(data, 16), dtype=self._bits)
            return bits.view(self.scalar_type)[()]
        raise TypeError(
            f"Invalid fill value {data!r} for {self._zarr_v3_name}: expected a number, "
            f"'NaN', 'Infinity', '-Infinity' or a hex string of {self.item_size} bytes"
        )

    def to_json_scalar(self, data: object, *, zarr_format: Literal[2, 3]) -> float | str:
        value = self.cast_scalar(data)
        if math.isnan(value):  # keep the exact NaN bits
            bits = np.array(value, dtype=self.scalar_type).view(self._bits)
            return f"0x{int(bits):0{2 * self.item_size}x}"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return float(value)  # exact: every finite value of these types is a float64


@dataclass(frozen=True, kw_only=True)
class BFloat16(_MLDtypesFloat, HasEndianness):
    """zarr v3 ``bfloat16``, read and written as :class:`ml_dtypes.bfloat16`."""

    dtype_cls = type(np.dtype(ml_dtypes.bfloat16))
    _zarr_v3_name = "bfloat16"
    scalar_type = ml_dtypes.bfloat16
    _bits = np.dtype(np.uint16)

    @classmethod
    def from_native_dtype(cls, dtype: Any) -> Self:
        if cls._check_native_dtype(dtype):
            order = dtype.byteorder
            if order in ("=", "|"):  # native
                order = "<" if sys.byteorder == "little" else ">"
            return cls(endianness="little" if order == "<" else "big")
        raise DataTypeValidationError(f"Invalid data type: {dtype}. Expected {cls.dtype_cls}")

    def to_native_dtype(self) -> np.dtype[Any]:
        # the bytes codec decodes via this dtype, so it must carry the stored byte order
        return np.dtype(self.scalar_type).newbyteorder(_NUMPY_BYTEORDER[self.endianness])


# 1-byte types have no endianness: the bytes codec then has no "endian" configuration.
@dataclass(frozen=True, kw_only=True)
class Float8E4M3FN(_MLDtypesFloat):
    """zarr v3 ``float8_e4m3fn``, read and written as :class:`ml_dtypes.float8_e4m3fn`."""

    dtype_cls = type(np.dtype(ml_dtypes.float8_e4m3fn))
    _zarr_v3_name = "float8_e4m3fn"
    scalar_type = ml_dtypes.float8_e4m3fn
    _bits = np.dtype(np.uint8)


@dataclass(frozen=True, kw_only=True)
class Float8E5M2(_MLDtypesFloat):
    """zarr v3 ``float8_e5m2``, read and written as :class:`ml_dtypes.float8_e5m2`."""

    dtype_cls = type(np.dtype(ml_dtypes.float8_e5m2))
    _zarr_v3_name = "float8_e5m2"
    scalar_type = ml_dtypes.float8_e5m2
    _bits = np.dtype(np.uint8)


def register_zarr_dtypes() -> None:
    """Register ``bfloat16``, ``float8_e4m3fn`` and ``float8_e5m2`` with zarr-python.

    Idempotent. A name that zarr-python (or a plugin) already registers with its own class is
    left alone, so native support, once zarr-python has it, wins.
    """
    for cls in (BFloat16, Float8E4M3FN, Float8E5M2):
        if cls._zarr_v3_name not in data_type_registry.contents:
            data_type_registry.register(cls._zarr_v3_name, cls)  # type: ignore[arg-type]
