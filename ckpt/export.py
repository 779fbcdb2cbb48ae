"""Exporting a checkpoint as one file of consolidated tensors: safetensors or ``torch.save``.

Every tensor is exported with its global shape, keyed by its path in the checkpoint
(``model/layer.weight``). Both formats are written without ever holding more than one block
of one tensor in memory:

- safetensors: the header is computed from the manifest alone and written first; then each
  tensor's bytes are streamed in row-major blocks (``ckpt.regions``: runs of whole chunk rows
  where they fit ``buffer_bytes``), in header order.
- torch: ``torch.save`` pickles a dict of tensors that must all exist at once. The tensors are
  therefore streamed into a staging file (next to the output, or in the temp directory for a
  remote output) which is memory-mapped; ``torch.save`` then copies them from the page cache,
  which the kernel can evict at will. Anonymous memory stays about one block (the mapped pages
  count in RSS while torch.save reads them, but are clean and reclaimable); the disk needs
  room for the output twice while it runs. The staging file is unlinked as soon as it is
  mapped, so nothing is left behind by a crash. The file loads with
  ``torch.load(path, mmap=True)`` as well.

Non-tensor values (``manifest.values``, in their stored JSON encoding) go into the safetensors
metadata as a JSON string under ``__ckpt_values__`` (beside ``__ckpt_values_by_writer__``,
``__ckpt_user_metadata__`` and ``__ckpt_step__``), and into the torch dict under the same keys
as Python objects. ``ckpt.state.decode_value`` turns an encoded value back into the original.
"""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import torch

from . import format as fmt
from .dtypes import info_by_name
from .errors import FormatError, LayoutError
from .layouts import ChunkLayout, Locator
from .manifest import ArraySpec, Manifest
from .regions import iter_tensor_bytes
from .storage import Storage

Progress = Callable[[int], None]

DEFAULT_BUFFER_BYTES = 256 << 20
FORMATS = ("safetensors", "torch")
VALUES_KEY = "__ckpt_values__"
VALUES_BY_WRITER_KEY = "__ckpt_values_by_writer__"
USER_METADATA_KEY = "__ckpt_user_metadata__"
STEP_KEY = "__ckpt_step__"

# torch dtype name -> safetensors dtype name.
SAFETENSORS_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "complex64": "C64",
}

_DTYPE_ALIASES = {
    "fp16": "float16", "half": "float16", "f16": "float16",
    "bf16": "bfloat16",
    "fp32": "float32", "float": "float32", "f32": "float32",
    "fp64": "float64", "double": "float64", "f64": "float64",
    "fp8_e4m3": "float8_e4m3fn", "f8_e4m3": "float8_e4m3fn", "float8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2", "f8_e5m2": "float8_e5m2",
}


def parse_dtype(name: str) -> torch.dtype:
    """A floating-point torch dtype from a name like ``bfloat16``, ``bf16``, ``fp32``."""
    key = name.strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    try:
        info = info_by_name(key)
    except LayoutError:
        raise ValueError(f"unknown dtype {name!r}; use a floating-point type such as bfloat16, float16, float32")
    if not info.torch_dtype.is_floating_point:
        raise ValueError(f"--dtype must be a floating-point type (it converts floating-point tensors), got {name!r}")
    return info.torch_dtype


# ---------------------------------------------------------------------------------------------
# Choosing what to export


@dataclass(frozen=True, slots=True)
class ExportItem:
    key: str
    spec: ArraySpec
    dtype: torch.dtype  # the exported dtype

    @property
    def nbytes(self) -> int:
        return self.spec.numel * self.dtype.itemsize


def _matches(path: str, include: Sequence[str]) -> bool:
    return not include or any(fnmatch.fnmatchcase(path, g) for g in include)


def select(
    manifest: Manifest, *, include: Sequence[str] = (), strip_prefix: str = "", cast: torch.dtype | None = None
) -> list[ExportItem]:
    """The tensors to export (matching any ``include`` glob; all if none), with their keys."""
    items = []
    keys: dict[str, str] = {}
    for path, spec in manifest.arrays.items():
        if not _matches(path, include):
            continue
        dtype = info_by_name(spec.dtype).torch_dtype
        if cast is not None and dtype.is_floating_point:
            dtype = cast
        key = path.removeprefix(strip_prefix) if strip_prefix else path
        if not key:
            raise ValueError(f"--strip-prefix {strip_prefix!r} leaves tensor {path!r} without a name")
        if key in keys:
            raise ValueError(f"tensors {keys[key]!r} and {path!r} both export as {key!r}; change --strip-prefix")
        keys[key] = path
        items.append(ExportItem(key, spec, dtype))
    if include and not items:
        raise ValueError(f"no tensor of step {manifest.step} matches --include {' '.join(include)}; "
                         "`ckpt inspect` lists the tensor paths")
    return items


def values_metadata(manifest: Manifest, include: Sequence[str] = (),
                    per_writer: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Non-tensor state to carry: values (filtered like tensors), per-writer values (default:
    those the commit point holds; ``ckpt.format.values_by_writer`` reads format 3's), user metadata."""
    values = {k: v for k, v in manifest.values.items() if _matches(k, include)}
    per_writer = manifest.values_by_writer if per_writer is None else per_writer
    by_writer = {w: {k: v for k, v in d.items() if _matches(k, include)} for w, d in per_writer.items()}
    by_writer = {w: d for w, d in by_writer.items() if d}
    out: dict[str, Any] = {STEP_KEY: manifest.step, VALUES_KEY: values}
    if by_writer:
        out[VALUES_BY_WRITER_KEY] = by_writer
    if manifest.user_metadata:
        out[USER_METADATA_KEY] = manifest.user_metadata
    return out


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True, slots=True)
class ExportResult:
    out: str
    format: str
    tensors: int
    nbytes: int  # tensor bytes written

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "format": self.format, "tensors": self.tensors, "bytes": self.nbytes}


def safetensors_header(items: Sequence[ExportItem], metadata: dict[str, str]) -> tuple[bytes, list[ExportItem]]:
    """The header bytes (length prefix included) and the items in data order."""
    for it in items:
        name = str(it.dtype).removeprefix("torch.")
        if name not in SAFETENSORS_DTYPES:
            raise LayoutError(
                f"tensor {it.spec.path!r} has dtype {name}, which safetensors cannot hold; use --format torch, "
                "--dtype to convert floating-point tensors, or --include to leave it out"
            )
    # Larger elements first keeps every tensor aligned to its element size (the header is padded to 8).
    ordered = sorted(items, key=lambda it: (-it.dtype.itemsize, it.key))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for it in ordered:
        header[it.key] = {
            "dtype": SAFETENSORS_DTYPES[str(it.dtype).removeprefix("torch.")],
            "shape": list(it.spec.shape),
            "data_offsets": [offset, offset + it.nbytes],
        }
        offset += it.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body, ordered


def write_safetensors_data(f: IO[bytes], storage: Storage, locator: Locator, ordered: Sequence[ExportItem], *,
                           threads: int, buffer_bytes: int, progress: Progress | None) -> None:
    """The tensors' bytes after a :func:`safetensors_header`, streamed block by block, in its order."""
    for it in ordered:
        written = 0
        for block in iter_tensor_bytes(storage, locator, it.spec, threads=threads, buffer_bytes=buffer_bytes,
                                       cast=it.dtype):
            f.write(block)
            written += block.nbytes
            if progress is not None:
                progress(block.nbytes)
        if written != it.nbytes:  # the header promised it.nbytes
            raise FormatError(f"{it.spec.path}: wrote {written} bytes, the header says {it.nbytes}")


def _open_output(out: str, storage_options: dict[str, Any] | None) -> tuple[IO[bytes], Callable[[bool], None]]:
    """A writable file for ``out`` and a finisher (``ok`` → publish; else discard).

    Local outputs are written to a temp file beside them and renamed into place, so a failed
    export never leaves a partial file under the final name.
    """
    if "://" in out and not out.startswith("file://"):
        import fsspec

        f = fsspec.open(out, "wb", **(storage_options or {})).open()

        def finish_remote(ok: bool) -> None:
            f.close()
            if not ok:
                try:
                    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
                    fs.rm(path)
                except (OSError, ValueError):
                    pass

        return f, finish_remote
    path = os.path.abspath(os.path.expanduser(out.removeprefix("file://")))
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"output directory {parent} does not exist; create it first")
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    f = open(tmp, "wb")  # noqa: SIM115 - closed by the finisher

    def finish_local(ok: bool) -> None:
        try:
            if ok:
                f.flush()
                os.fsync(f.fileno())
            f.close()
            if ok:
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    return f, finish_local


def _staging_dir(out: str) -> str:
    if "://" in out and not out.startswith("file://"):
        return tempfile.gettempdir()
    return os.path.dirname(os.path.abspath(os.path.expanduser(out.removeprefix("file://"))))


def export_step(
    storage: Storage,
    step: int,
    out: str,
    *,
    format: str = "safetensors",  # noqa: A002 - the CLI flag's name
    include: Sequence[str] = (),
    cast: torch.dtype | None = None,
    strip_prefix: str = "",
    values: bool = True,
    threads: int = 8,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    storage_options: dict[str, Any] | None = None,
    progress: Progress | None = None,
    manifest: Manifest | None = None,
) -> ExportResult:
    """Export committed step ``step`` to the file ``out`` (a local path or an fsspec URL)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    if buffer_bytes < 1 or threads < 1:
        raise ValueError("buffer_bytes and threads must be >= 1")
    manifest = manifest or fmt.read_manifest(storage, step)
    items = select(manifest, include=include, strip_prefix=strip_prefix, cast=cast)
    meta = values_metadata(manifest, include, fmt.values_by_writer(storage, manifest)) if values else {}
    locator = Locator(storage, step, ChunkLayout.of(manifest), manifest.arrays)
    if format == "safetensors":
        _export_safetensors(storage, locator, out, items, meta, threads, buffer_bytes, storage_options, progress)
    else:
        _export_torch(storage, locator, out, items, meta, threads, buffer_bytes, storage_options, progress)
    return ExportResult(out, format, len(items), sum(it.nbytes for it in items))


def _export_safetensors(
    storage: Storage, locator: Locator, out: str, items: list[ExportItem], meta: dict[str, Any],
    threads: int, buffer_bytes: int, storage_options: dict[str, Any] | None,
    progress: Progress | None,
) -> None:
    str_meta = {"format": "pt", **{k: json.dumps(v, separators=(",", ":")) for k, v in meta.items()}}
    header, ordered = safetensors_header(items, str_meta)
    f, finish = _open_output(out, storage_options)
    ok = False
    try:
        f.write(header)
        write_safetensors_data(f, storage, locator, ordered, threads=threads, buffer_bytes=buffer_bytes,
                               progress=progress)
        ok = True
    finally:
        finish(ok)


def _export_torch(
    storage: Storage, locator: Locator, out: str, items: list[ExportItem], meta: dict[str, Any],
    threads: int, buffer_bytes: int, storage_options: dict[str, Any] | None,
    progress: Progress | None,
) -> None:
    import numpy as np

    staging = os.path.join(_staging_dir(out), f".ckpt-export-{uuid.uuid4().hex}.staging")
    align = 64
    offsets: dict[str, int] = {}
    try:
        with open(staging, "wb") as sf:
            pos = 0
            for it in items:
                pad = -pos % align
                sf.write(b"\0" * pad)
                pos += pad
                offsets[it.key] = pos
                for block in iter_tensor_bytes(storage, locator, it.spec, threads=threads, buffer_bytes=buffer_bytes,
                                               cast=it.dtype):
                    sf.write(block)
                    pos += block.nbytes
                    if progress is not None:
                        progress(block.nbytes)
        # Copy-on-write mapping: torch sees writable memory (no warning), pages stay file-backed.
        mapped = np.memmap(staging, dtype=np.uint8, mode="c") if pos else None
    finally:
        if os.path.exists(staging):
            os.remove(staging)  # the mapping keeps the data reachable until it is dropped

    state: dict[str, Any] = {}
    for it in items:
        if it.nbytes == 0:
            state[it.key] = torch.empty(it.spec.shape, dtype=it.dtype)
            continue
        assert mapped is not None
        raw = torch.from_numpy(mapped[offsets[it.key] : offsets[it.key] + it.nbytes])
        state[it.key] = raw.view(it.dtype).reshape(it.spec.shape)
    state.update(meta)
    f, finish = _open_output(out, storage_options)
    ok = False
    try:
        torch.save(state, f)
        ok = True
    finally:
        finish(ok)
        state.clear()
        del mapped
