"""``ckpt reshard`` and ``ckpt export``: a committed step written anew, as another checkpoint
or as one file of consolidated tensors (folders for DCP and Hugging Face: ``ckpt.cli.bridge``).

Both check what they can before reading any tensor (the target layout, the output format,
the output path, the selection of tensors), so that bad input is a usage error at once and
not a failure after minutes of copying. The work itself is :func:`ckpt.reshard.reshard` and
:func:`ckpt.export.export_step`, imported when the command runs.
"""

from __future__ import annotations

import argparse
import os

from .. import format as fmt
from .common import (
    EXIT_OK,
    UsageError,
    format_bytes,
    open_url,
    parse_storage_options,
    print_json,
    progress_bar,
    resolve_step,
)


def cmd_consolidate(args: argparse.Namespace) -> int:
    from ..consolidate import consolidate

    storage = open_url(args.run, args)
    steps = [resolve_step(storage, args.step)] if args.step is not None or not args.all else fmt.committed_steps(storage)
    done = []
    for step in steps:
        m = fmt.read_manifest(storage, step)
        total = sum(s.num_chunks for s in m.arrays.values())
        with progress_bar(args, None, f"consolidate step {step}") as bar:
            new = consolidate(storage, step, threads=args.threads, progress=bar.update)
        done.append({"step": step, "layout_before": m.layout, "layout": new.layout, "tensors": len(new.arrays),
                     "chunks": total})
    if args.json:
        print_json(done)
    else:
        for d in done:
            what = "already zarr-readable" if d["layout_before"] != "packs" else "consolidated: zarr-readable"
            print(f"step {d['step']}: {what} ({d['tensors']} tensors, layout {d['layout']})")
    return EXIT_OK


def cmd_reshard(args: argparse.Namespace) -> int:
    from ..reshard import parse_layout, reshard

    try:
        target = parse_layout(args.to)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if target.kind == "chunks" and args.max_chunk_bytes is not None:
        raise UsageError("--max-chunk-bytes cannot be combined with --to chunks:BYTES (it already sets the size)")
    src = open_url(args.run, args)
    dst = open_url(args.out, args)
    step = resolve_step(src, args.step)
    bar = progress_bar(args, None, f"reshard step {step}")
    with bar:
        def start(total: int) -> None:
            bar.total = total
            bar.refresh()

        m = reshard(src, step, dst, target, step_out=args.step_out, max_chunk_bytes=args.max_chunk_bytes,
                    buffer_bytes=args.buffer_bytes, threads=args.threads, overwrite=args.overwrite,
                    progress=bar.update, on_start=start)
    chunks = sum(a.num_chunks for a in m.arrays.values())
    if args.json:
        print_json({"source": src.url, "source_step": step, "out": dst.url, "step": m.step, "layout": str(target),
                     "tensors": len(m.arrays), "chunks": chunks})
    else:
        print(f"wrote step {m.step} of {dst.url}: {len(m.arrays)} tensors, {chunks} chunks, layout {target}")
    return EXIT_OK


_EXTENSIONS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch"}


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export_step, parse_dtype, select

    form = args.format
    if form is None:
        form = _EXTENSIONS.get(os.path.splitext(args.out)[1].lower())
        if form is None:
            raise UsageError("cannot tell the format from OUT's extension; pass --format safetensors, torch, dcp or hf")
    if form in ("dcp", "hf"):
        from .bridge import cmd_export_folder

        return cmd_export_folder(args, form)
    if args.max_shard_size or args.config or args.allow_pickle:
        raise UsageError("--max-shard-size and --config are for --format hf, --allow-pickle for --format dcp")
    args.strip_prefix = args.strip_prefix or ""
    cast = None
    if args.dtype is not None:
        try:
            cast = parse_dtype(args.dtype)
        except ValueError as e:
            raise UsageError(str(e)) from e
    remote_out = "://" in args.out and not args.out.startswith("file://")
    if not remote_out:
        local = os.path.abspath(os.path.expanduser(args.out.removeprefix("file://")))
        if os.path.isdir(local):
            raise UsageError(f"OUT {args.out!r} is a directory; give a file name")
        if not os.path.isdir(os.path.dirname(local)):
            raise UsageError(f"the directory of OUT {args.out!r} does not exist; create it first")
        if os.path.exists(local) and not args.overwrite:
            raise UsageError(f"{args.out!r} exists; pass --overwrite to replace it")
    storage = open_url(args.run, args)
    step = resolve_step(storage, args.step)
    manifest = fmt.read_manifest(storage, step)
    try:
        items = select(manifest, include=args.include or (), strip_prefix=args.strip_prefix, cast=cast)
    except ValueError as e:
        raise UsageError(str(e)) from e
    with progress_bar(args, sum(i.nbytes for i in items), f"export step {step}") as bar:
        result = export_step(
            storage, step, args.out, format=form, include=args.include or (), cast=cast,
            strip_prefix=args.strip_prefix, values=not args.no_values, threads=args.threads,
            buffer_bytes=args.buffer_bytes, storage_options=parse_storage_options(args), progress=bar.update,
            manifest=manifest,
        )
    if args.json:
        print_json({"step": step, **result.to_dict()})
    else:
        print(f"exported step {step}: {result.tensors} tensors, {format_bytes(result.nbytes)} to {result.out} "
              f"({result.format})")
    return EXIT_OK
