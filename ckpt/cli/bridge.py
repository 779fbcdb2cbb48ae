"""``ckpt import dcp|hf`` and ``ckpt export --format dcp|hf``: checkpoints of other libraries
in and out.

Bad input is refused before anything is written where it can be seen at once (an existing step
without ``--overwrite``, an output folder that holds weights, a source that is not a DCP or
Hugging Face checkpoint, a truncated file, an index naming a missing shard); what is found only
while copying removes what was written. The work is :mod:`ckpt.dcp` and :mod:`ckpt.hf`,
imported when the command runs.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .. import format as fmt
from ..storage import Storage
from .common import (
    EXIT_OK,
    UsageError,
    format_bytes,
    open_url,
    print_json,
    progress_bar,
    resolve_step,
)


def _local_root(url: str) -> str | None:
    if "://" in url and not url.startswith("file://"):
        return None
    return os.path.abspath(os.path.expanduser(url.removeprefix("file://")))


def cmd_import(args: argparse.Namespace) -> int:
    src = open_url(args.src, args)
    dst = open_url(args.run, args)
    step_dir_exists = any(s.step == args.step and s.committed for s in fmt.list_steps(dst))
    if step_dir_exists and not args.overwrite:
        raise UsageError(f"step {args.step} is already committed in {dst.url}; pass --overwrite to replace it, or "
                         "choose another --step")
    root = _local_root(args.run)
    created = root is not None and not os.path.exists(root)
    options: dict[str, Any] = {"layout": args.layout, "overwrite": args.overwrite, "buffer_bytes": args.buffer_bytes,
                               "threads": args.threads}
    if args.max_chunk_bytes is not None:
        options["max_chunk_bytes"] = args.max_chunk_bytes
    with progress_bar(args, None, f"import {args.source_format} into step {args.step}") as bar:
        def start(total: int) -> None:
            bar.total = total
            bar.refresh()

        try:
            manifest = _run_import(args, src, dst, options, bar.update, start)
        except BaseException:
            if created and os.path.isdir(root) and not _has_files(root):
                import shutil

                shutil.rmtree(root, ignore_errors=True)
            raise
    nbytes = sum(a.numel * _itemsize(a.dtype) for a in manifest.arrays.values())
    result = {"source": src.url, "format": args.source_format, "run": dst.url, "step": manifest.step,
              "layout": manifest.layout, "tensors": len(manifest.arrays), "values": len(manifest.values),
              "bytes": nbytes}
    if args.json:
        print_json(result)
    else:
        print(f"imported {args.source_format} checkpoint {src.url} as step {manifest.step} of {dst.url}: "
              f"{len(manifest.arrays)} tensors, {format_bytes(nbytes)}, {len(manifest.values)} values, "
              f"layout {manifest.layout}")
    return EXIT_OK


def _run_import(args: argparse.Namespace, src: Storage, dst: Storage, options: dict[str, Any], progress: Any,
                start: Any) -> Any:
    if args.source_format == "dcp":
        from ..dcp.importer import import_dcp

        return import_dcp(src, dst, args.step, progress=progress, on_start=start, **options)
    from ..hf.importer import import_hf

    return import_hf(src, dst, args.step, prefix=args.prefix, restore_tied=not args.no_tied, progress=progress,
                     on_start=start, **options)


def _has_files(root: str) -> bool:
    return any(files for _d, _s, files in os.walk(root))


def _itemsize(dtype: str) -> int:
    from ..dtypes import info_by_name

    return info_by_name(dtype).itemsize


def cmd_export_folder(args: argparse.Namespace, form: str) -> int:
    """``ckpt export --format dcp|hf``: a folder."""
    from ..export import parse_dtype, select

    if form == "dcp" and (args.dtype or args.strip_prefix or args.max_shard_size or args.config):
        raise UsageError("--dtype, --strip-prefix, --max-shard-size and --config are for --format hf (a DCP export "
                         "keeps the checkpoint's keys and dtypes)")
    if form == "hf" and (args.no_values or args.allow_pickle):
        raise UsageError("--no-values and --allow-pickle are for --format dcp (a Hugging Face folder holds tensors only)")
    local = _local_root(args.out)
    if local is None:
        raise UsageError(f"OUT {args.out!r}: --format {form} writes a local folder; copy it afterwards")
    if os.path.exists(local) and not os.path.isdir(local):
        raise UsageError(f"OUT {args.out!r} is a file; --format {form} writes a folder")
    if not os.path.isdir(os.path.dirname(local)):
        raise UsageError(f"the directory of OUT {args.out!r} does not exist; create it first")
    if args.config is not None and not os.path.isfile(args.config):
        raise UsageError(f"--config {args.config!r} is not a file")
    storage = open_url(args.run, args)
    step = resolve_step(storage, args.step)
    manifest = fmt.read_manifest(storage, step)
    cast = None
    if args.dtype is not None:
        try:
            cast = parse_dtype(args.dtype)
        except ValueError as e:
            raise UsageError(str(e)) from e
    strip = "model/" if args.strip_prefix is None else args.strip_prefix
    include = args.include or ([strip + "*"] if form == "hf" and strip else [])
    try:
        items = select(manifest, include=include, strip_prefix=strip if form == "hf" else "", cast=cast)
    except ValueError as e:
        raise UsageError(str(e)) from e
    try:
        with progress_bar(args, sum(i.nbytes for i in items), f"export step {step} ({form})") as bar:
            if form == "dcp":
                from ..dcp.exporter import export_dcp

                result = export_dcp(storage, step, local, include=args.include or (), values=not args.no_values,
                                    allow_pickle=args.allow_pickle, buffer_bytes=args.buffer_bytes,
                                    threads=args.threads, overwrite=args.overwrite, progress=bar.update,
                                    manifest=manifest)
            else:
                from ..hf.exporter import DEFAULT_MAX_SHARD_BYTES, export_hf

                result = export_hf(storage, step, local, include=include, strip_prefix=strip, cast=cast,
                                   max_shard_bytes=args.max_shard_size or DEFAULT_MAX_SHARD_BYTES, config=args.config,
                                   overwrite=args.overwrite, threads=args.threads, buffer_bytes=args.buffer_bytes,
                                   progress=bar.update, manifest=manifest)
    except FileExistsError as e:
        raise UsageError(str(e)) from e
    if args.json:
        print_json({"step": step, **result})
    else:
        extra = f", tied weights left out: {', '.join(result['tied_left_out'])}" if result.get("tied_left_out") else ""
        print(f"exported step {step}: {result['tensors']} tensors, {format_bytes(result['bytes'])} to {result['out']} "
              f"({form}: {', '.join(result['files'][:3])}{' …' if len(result['files']) > 3 else ''}){extra}")
    return EXIT_OK
