"""The ``ckpt`` command: list, inspect, verify, reshard, export and garbage-collect checkpoints.

Exit codes (also in ``ckpt --help`` and docs/cli.md):

    0  success
    1  ``ckpt verify`` found problems (each is printed)
    2  usage error or bad input: bad arguments, bad URL, missing or incomplete step
    3  the checkpoint is corrupt or unreadable (bad commit point, bad chunk while copying)
    4  storage error: storage failed after retries, permission denied, out of space
    5  internal error: a bug in ckpt; rerun with --debug and report the traceback

Errors print one line, ``ckpt: error: ...``, on stderr; ``--debug`` adds the traceback.
Output goes to stdout (tables, or JSON with ``--json``); progress bars go to stderr, shown when
stderr is a terminal or with ``--progress``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .. import format as fmt
from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptError,
    CommitError,
    CorruptCheckpointError,
    FormatError,
    StorageError,
    UnsupportedValueError,
)
from ..manifest import ArraySpec, ManifestError
from ..storage import Storage, open_storage

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_CORRUPT = 3
EXIT_STORAGE = 4
EXIT_INTERNAL = 5

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  verify found problems (each one is printed)
  2  usage error or bad input: bad arguments, bad URL, missing or incomplete step
  3  corrupt or unreadable checkpoint
  4  storage error (after retries), permission denied, no space
  5  internal error (a bug: rerun with --debug and report it)
"""


class UsageError(CkptError, ValueError):
    """Bad command-line input."""


class _Parser(argparse.ArgumentParser):
    """Reports usage errors as exceptions, so ``main`` returns instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------------------------
# Small helpers


def _err(message: str) -> None:
    line = " ".join(str(message).split())  # always one line
    print(f"ckpt: error: {line}", file=sys.stderr)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, allow_nan=False, default=str))


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def _dims(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "()"


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _progress(args: argparse.Namespace, total: int | None, desc: str) -> Any:
    from tqdm.auto import tqdm

    enabled = bool(getattr(args, "progress", False)) or sys.stderr.isatty()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                disable=not enabled, leave=False)


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in getattr(args, "storage_option", None) or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--storage-option {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(raw)  # true, 3, {"a": 1} ... ; anything else is a string
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _open(url: str, args: argparse.Namespace) -> Storage:
    try:
        return open_storage(url, storage_options=_storage_options(args))
    except StorageError as e:  # a URL that names no usable filesystem is bad input
        raise UsageError(str(e)) from e
    except (TypeError, ValueError) as e:  # a filesystem refusing the storage options
        raise UsageError(f"cannot open {url!r}: {e}") from e


def resolve_step(storage: Storage, step: int | None) -> int:
    """``step`` if it is committed, else the newest committed step; clear errors otherwise."""
    infos = fmt.list_steps(storage)
    committed = [s.step for s in infos if s.committed]
    if step is None:
        if not committed:
            extra = f" ({len(infos)} incomplete step(s); `ckpt ls` lists them)" if infos else ""
            raise CheckpointNotFoundError(f"no committed checkpoint in {storage.url}{extra}")
        return committed[-1]
    found = next((s for s in infos if s.step == step), None)
    if found is None:
        near = ", ".join(map(str, committed[-5:])) or "none"
        raise CheckpointNotFoundError(
            f"step {step} not found in {storage.url}; newest committed steps: {near} (`ckpt ls` lists all)"
        )
    if not found.committed:
        raise CheckpointNotFoundError(
            f"step {step} in {storage.url} is incomplete (no commit point: a save in progress, or one that "
            "failed); it cannot be read. `ckpt gc` removes stale incomplete steps"
        )
    return step


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return v


def _pos_int(text: str) -> int:
    v = _nonneg_int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


def _keep_last(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(
            f"must be >= 1, got {v}: the newest committed step is never removed"
        )
    return v


def _bytes_arg(text: str) -> int:
    from ..reshard import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    scale = units.get(t[-1:], None) if t else None
    try:
        v = float(t[:-1] if scale else t) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (or e.g. 30m, 2h, 1d), got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative duration, got {text!r}")
    return v


# ---------------------------------------------------------------------------------------------
# ls


def cmd_ls(args: argparse.Namespace) -> int:
    from ..retention import format_age, list_run

    storage = _open(args.run, args)
    listing = list_run(storage, threads=args.threads)
    now = time.time()
    rows = []
    for s in listing:
        status = "corrupt" if s.error else ("committed" if s.committed else "incomplete")
        when = s.created_at if s.created_at is not None else s.modified_at
        rows.append({
            "step": s.step,
            "status": status,
            "committed": s.committed,
            "bytes": s.nbytes,
            "files": s.files,
            "created_at": s.created_at,
            "modified_at": s.modified_at,
            "age_s": None if when is None else max(0.0, now - when),
            "tensors": s.tensors,
            "error": s.error,
        })
    if args.json:
        _print_json(rows)
    elif rows:
        _table(
            [[str(r["step"]), r["status"], format_bytes(r["bytes"]), format_age(r["age_s"]),
              "-" if r["tensors"] is None else str(r["tensors"])] for r in rows],
            ["STEP", "STATUS", "SIZE", "AGE", "TENSORS"],
        )
        for r in rows:
            if r["error"]:
                print(f"step {r['step']}: {r['error']}", file=sys.stderr)
    if not rows:
        print(f"ckpt: no checkpoint steps in {storage.url}", file=sys.stderr)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# inspect


def layout_summary(layout: dict[str, Any]) -> str:
    """One short phrase for an array's save-time layout description."""
    kind = layout.get("kind")
    if kind == "plain" or not layout:
        return "plain"
    if kind == "replicated":
        return f"replicated x{layout.get('replicas', '?')}"
    if kind == "dtensor":
        names = layout.get("mesh_dim_names") or []
        mesh = "x".join(map(str, layout.get("mesh_shape", [])))
        named = f"({','.join(names)})" if names else ""
        return f"dtensor mesh {mesh}{named} [{','.join(layout.get('placements', []))}]"
    if kind == "sharded":
        if layout.get("dim") is None:
            text = "sharded unsplit"
        else:
            text = f"sharded dim {layout['dim']} / {layout.get('world', '?')}"
        if layout.get("parts"):
            text += f" parts {layout['parts']}"
        if layout.get("logical_size") is not None:
            text += f" logical {layout['logical_size']} (padded {layout.get('padded_size')})"
        if (layout.get("replicas") or 1) > 1:
            text += f" x{layout['replicas']} replicas"
        if layout.get("averaged"):
            text += " averaged"
        return text
    if kind == "resharded":
        return f"resharded {layout.get('target')}" + (" (replicated)" if layout.get("replicated") else "")
    return _short(layout, 60)


def _array_info(spec: ArraySpec) -> dict[str, Any]:
    from ..dtypes import info_by_name

    try:
        itemsize = info_by_name(spec.dtype).itemsize
    except CkptError:
        itemsize = None
    return {
        "path": spec.path,
        "shape": list(spec.shape),
        "dtype": spec.dtype,
        "chunk_shape": list(spec.chunk_shape),
        "grid_shape": list(spec.grid_shape),
        "chunks": spec.num_chunks,
        "bytes": spec.numel * itemsize if itemsize is not None else None,
        "layout": spec.layout,
        "layout_summary": layout_summary(spec.layout),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    storage = _open(args.run, args)
    step = resolve_step(storage, args.step)
    m = fmt.read_manifest(storage, step)
    tensors = [_array_info(a) for a in m.arrays.values()]
    info = {
        "url": storage.url,
        "step": m.step,
        "save_id": m.save_id,
        "created_at": m.created_at,
        "created": _iso(m.created_at),
        "format_version": m.format_version,
        "library_versions": m.library_versions,
        "writers": list(m.writers),
        "tensors": tensors,
        "bytes": sum(t["bytes"] or 0 for t in tensors),
        "values": m.values,
        "values_by_writer": m.values_by_writer,
        "user_metadata": m.user_metadata,
    }
    if args.json:
        _print_json(info)
        return EXIT_OK
    from ..retention import format_age

    print(f"step {m.step} of {storage.url}")
    print(f"  committed    {info['created']} ({format_age(time.time() - m.created_at)} ago)")
    print(f"  format       ckpt v{m.format_version}, save id {m.save_id}")
    versions = ", ".join(f"{k} {v}" for k, v in sorted(m.library_versions.items())) or "-"
    print(f"  libraries    {versions}")
    shown = ", ".join(m.writers[:8]) + (f", ... ({len(m.writers) - 8} more)" if len(m.writers) > 8 else "")
    print(f"  writers      {len(m.writers)}: {shown}")
    print(f"\ntensors: {len(tensors)}, {format_bytes(info['bytes'])}")
    if tensors:
        _table(
            [[t["path"], _dims(t["shape"]), t["dtype"], _dims(t["chunk_shape"]), str(t["chunks"]), t["layout_summary"]]
             for t in tensors],
            ["PATH", "SHAPE", "DTYPE", "CHUNK", "CHUNKS", "LAYOUT"],
        )
    print(f"\nvalues: {len(m.values)}")
    for k, v in m.values.items():
        print(f"  {k} = {_short(v)}")
    if m.values_by_writer:
        print("\nvalues that differ by writer:")
        for w, d in m.values_by_writer.items():
            for k, v in d.items():
                print(f"  {w}: {k} = {_short(v)}")
    if m.user_metadata:
        print("\nuser metadata:")
        for k, v in m.user_metadata.items():
            print(f"  {k} = {_short(v)}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# verify


def cmd_verify(args: argparse.Namespace) -> int:
    from ..verify import step_nbytes, verify_step

    storage = _open(args.run, args)
    skipped: list[int] = []
    if args.all:
        infos = fmt.list_steps(storage)
        steps = [s.step for s in infos if s.committed]
        skipped = [s.step for s in infos if not s.committed]
        if not steps:
            resolve_step(storage, None)  # raises the clear "no committed checkpoint" error
    else:
        steps = [resolve_step(storage, args.step)]
    total = 0
    for s in steps:
        try:
            total += step_nbytes(fmt.read_manifest(storage, s))
        except CkptError:  # an unreadable manifest is reported by verify_step
            pass
    reports = []
    with _progress(args, total or None, "verify") as bar:
        for s in steps:
            reports.append(verify_step(storage, s, threads=args.threads, progress=bar.update))
    bad = sum(len(r.problems) for r in reports)
    if args.json:
        _print_json({
            "url": storage.url,
            "ok": bad == 0,
            "steps": [r.to_dict() for r in reports],
            "skipped_incomplete": skipped,
        })
    else:
        for r in reports:
            if r.ok:
                print(f"step {r.step}: OK ({r.arrays} tensors, {r.chunks} chunks, {format_bytes(r.bytes)}, "
                      f"{r.writers} writers)")
            else:
                print(f"step {r.step}: FAILED: {len(r.problems)} problem(s)")
                for p in r.problems:
                    print(f"  {p.message}")
        for s in skipped:
            print(f"step {s}: skipped (incomplete)")
    if bad:
        failed = [str(r.step) for r in reports if not r.ok]
        print(f"ckpt: verify found {bad} problem(s) in step(s) {', '.join(failed)}", file=sys.stderr)
        return EXIT_PROBLEMS
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# reshard


def cmd_reshard(args: argparse.Namespace) -> int:
    from ..reshard import parse_layout, reshard

    try:
        target = parse_layout(args.to)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if target.kind == "chunks" and args.max_chunk_bytes is not None:
        raise UsageError("--max-chunk-bytes cannot be combined with --to chunks:BYTES (it already sets the size)")
    src = _open(args.run, args)
    dst = _open(args.out, args)
    step = resolve_step(src, args.step)
    bar = _progress(args, None, f"reshard step {step}")
    with bar:
        def start(total: int) -> None:
            bar.total = total
            bar.refresh()

        m = reshard(src, step, dst, target, step_out=args.step_out, max_chunk_bytes=args.max_chunk_bytes,
                    buffer_bytes=args.buffer_bytes, threads=args.threads, overwrite=args.overwrite,
                    progress=bar.update, on_start=start)
    chunks = sum(a.num_chunks for a in m.arrays.values())
    if args.json:
        _print_json({"source": src.url, "source_step": step, "out": dst.url, "step": m.step, "layout": str(target),
                     "tensors": len(m.arrays), "chunks": chunks})
    else:
        print(f"wrote step {m.step} of {dst.url}: {len(m.arrays)} tensors, {chunks} chunks, layout {target}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# export


_EXTENSIONS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch"}


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export_step, parse_dtype, select

    form = args.format
    if form is None:
        form = _EXTENSIONS.get(os.path.splitext(args.out)[1].lower())
        if form is None:
            raise UsageError("cannot tell the format from OUT's extension; pass --format safetensors or --format torch")
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
    storage = _open(args.run, args)
    step = resolve_step(storage, args.step)
    manifest = fmt.read_manifest(storage, step)
    try:
        items = select(manifest, include=args.include or (), strip_prefix=args.strip_prefix, cast=cast)
    except ValueError as e:
        raise UsageError(str(e)) from e
    with _progress(args, sum(i.nbytes for i in items), f"export step {step}") as bar:
        result = export_step(
            storage, step, args.out, format=form, include=args.include or (), cast=cast,
            strip_prefix=args.strip_prefix, values=not args.no_values, threads=args.threads,
            buffer_bytes=args.buffer_bytes, storage_options=_storage_options(args), progress=bar.update,
            manifest=manifest,
        )
    if args.json:
        _print_json({"step": step, **result.to_dict()})
    else:
        print(f"exported step {step}: {result.tensors} tensors, {format_bytes(result.nbytes)} to {result.out} "
              f"({result.format})")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# gc


def cmd_gc(args: argparse.Namespace) -> int:
    from ..retention import DELETE, RetentionPolicy, run_gc

    policy = RetentionPolicy(keep_last=args.keep_last, keep_every=args.keep_every, min_age_s=args.min_age)
    storage = _open(args.run, args)
    result = run_gc(storage, policy, dry_run=args.dry_run, clean_tmp=True)
    decisions = result.plan.decisions
    if args.json:
        _print_json({"url": storage.url, **result.to_dict()})
    else:
        verb = "would delete" if args.dry_run else "delete"
        rows = []
        for d in decisions:
            action = verb if d.action == DELETE else "keep"
            if d.action == DELETE and d.step in result.errors:
                action = "FAILED"
            rows.append([action, str(d.step), "committed" if d.committed else "incomplete",
                         format_bytes(d.nbytes), d.reason])
        if rows:
            _table(rows, ["ACTION", "STEP", "STATUS", "SIZE", "REASON"])
        gone = result.plan.to_delete
        freed = sum(d.nbytes or 0 for d in gone if args.dry_run or d.step in result.deleted)
        count = len(gone) if args.dry_run else len(result.deleted)
        print(f"{'would delete' if args.dry_run else 'deleted'} {count} step(s), "
              f"{'would free' if args.dry_run else 'freed'} {format_bytes(freed)}")
        if result.stale_tmp:
            print(f"{'would remove' if args.dry_run else 'removed'} {len(result.stale_tmp)} temporary file(s) of "
                  "interrupted writes in kept steps")
    for s, e in result.errors.items():
        _err(f"could not delete step {s}: {e}")
    return EXIT_STORAGE if result.errors else EXIT_OK


# ---------------------------------------------------------------------------------------------
# Parser and main


def _common(json_flag: bool) -> argparse.ArgumentParser:
    """Flags every command takes, before or after its name (defaults are applied in main)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="print the full traceback on error")
    g.add_argument("--storage-option", action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS,
                   help="fsspec storage option, repeatable (VALUE is parsed as JSON when it can be: "
                        "anon=true, client_kwargs='{\"region_name\":\"x\"}')")
    g.add_argument("--progress", action="store_true", default=argparse.SUPPRESS,
                   help="show progress bars on stderr even when it is not a terminal")
    if json_flag:
        g.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ckpt",
        description="Inspect and manage ckpt checkpoints. RUN is a local path or an fsspec URL "
                    "(file://, memory://, s3://bucket/prefix, ...).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common(json_flag=False)],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, help_: str, func: Callable[[argparse.Namespace], int], description: str | None = None,
            json_flag: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=description or help_, parents=[_common(json_flag)],
                           epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    def threads(p: argparse.ArgumentParser, default: int = 8) -> None:
        p.add_argument("--threads", type=_pos_int, default=default,
                       help=f"parallel storage requests (default {default})")

    p = add("ls", "list every step of a run", cmd_ls,
            "List every step of RUN: step, committed/incomplete, size on storage, age (commit time for committed "
            "steps, newest file time for incomplete ones), number of tensors.")
    p.add_argument("run", metavar="RUN")
    threads(p)

    p = add("inspect", "show what a checkpoint holds", cmd_inspect,
            "Show tensors (path, global shape, dtype, chunk shape, number of chunks, save layout), writers, "
            "library and format versions, non-tensor values (and where writers differ), user metadata.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--step", type=_nonneg_int, help="step to inspect (default: newest committed)")

    p = add("verify", "check every chunk and every piece of metadata of a checkpoint", cmd_verify,
            "Read every chunk of every tensor and check presence, size, checksum (stored and recorded by its "
            "writer), array and group metadata against the manifest, and every writer's fragment. Prints each "
            "problem naming the tensor and chunk; exits 1 if there is any.")
    p.add_argument("run", metavar="RUN")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=_nonneg_int, help="step to verify (default: newest committed)")
    which.add_argument("--all", action="store_true", help="verify every committed step")
    threads(p)

    p = add("reshard", "rewrite a checkpoint with chunks aligned to a target layout", cmd_reshard,
            "Write step N of RUN as a new committed checkpoint in run OUT whose chunk grids are aligned to "
            "LAYOUT, so that loading under that layout reads whole chunks. LAYOUT: shard:DIM:N (tensors with "
            "more than DIM dims sharded along DIM over N ranks, torch.chunk semantics; others replicated), "
            "chunks:BYTES (re-chunk to at most BYTES per chunk, e.g. chunks:64MiB), whole (one chunk per "
            "tensor, up to --max-chunk-bytes, default 1GiB for this layout). Memory: about --buffer-bytes + "
            "--threads x (source chunk + target chunk).")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--step", type=_nonneg_int, help="source step (default: newest committed)")
    p.add_argument("--to", required=True, metavar="LAYOUT", help="shard:DIM:N | chunks:BYTES | whole")
    p.add_argument("out", metavar="OUT", help="run to write into (may be RUN itself with another --step-out)")
    p.add_argument("--step-out", type=_nonneg_int, help="step number in OUT (default: the source step)")
    p.add_argument("--max-chunk-bytes", type=_bytes_arg, metavar="BYTES",
                   help="largest chunk for shard:/whole (default 16MiB for shard, 1GiB for whole)")
    p.add_argument("--buffer-bytes", type=_bytes_arg, default=256 << 20, metavar="BYTES",
                   help="host buffer for one block of one tensor (default 256MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace a committed step of the same number in OUT")
    threads(p)

    p = add("export", "export consolidated tensors to safetensors or torch.save", cmd_export,
            "Write every tensor of step N with its global shape, keyed by its path, to one file. safetensors is "
            "streamed block by block. torch: torch.save needs every tensor at once, so tensors are staged in a "
            "memory-mapped temp file beside OUT (needs free disk for twice the output while running; anonymous "
            "memory stays about one block, the mapped pages are reclaimable page cache). Non-tensor values go "
            "into __ckpt_values__ (safetensors metadata, as a JSON string; a dict entry for torch).")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--step", type=_nonneg_int, help="step to export (default: newest committed)")
    p.add_argument("--format", choices=["safetensors", "torch"],
                   help="output format (default: from OUT's extension: .safetensors, or .pt/.pth/.bin)")
    p.add_argument("out", metavar="OUT", help="output file (local path or fsspec URL)")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="only tensors (and values) whose path matches, repeatable (e.g. 'model/*')")
    p.add_argument("--dtype", help="convert floating-point tensors to this dtype (bfloat16, float16, float32, ...)")
    p.add_argument("--strip-prefix", default="", metavar="PREFIX",
                   help="remove PREFIX from the keys (e.g. 'model/' for a plain model state dict)")
    p.add_argument("--no-values", action="store_true", help="tensors only: leave out non-tensor values")
    p.add_argument("--buffer-bytes", type=_bytes_arg, default=256 << 20, metavar="BYTES",
                   help="host buffer for one block of one tensor (default 256MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    threads(p)

    p = add("gc", "delete old checkpoints and stale incomplete steps", cmd_gc,
            "Delete committed steps beyond the --keep-last newest (keeping multiples of --keep-every), and "
            "incomplete steps that are stale: untouched for --min-age, or preceding the newest committed step "
            "and untouched since it was committed. The newest committed step is never deleted. A committed step "
            "is deleted commit point first, so it is never seen half-deleted.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--keep-last", type=_keep_last, required=True, metavar="K", help="committed steps to keep (>= 1)")
    p.add_argument("--keep-every", type=_pos_int, metavar="N", help="also keep committed steps with step %% N == 0")
    p.add_argument("--min-age", type=_duration, default=3600.0, metavar="SECONDS",
                   help="age (newest file) after which an incomplete step is stale (default 3600; 30m, 2h, 1d work)")
    p.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    return parser


# Filesystem client libraries whose own exceptions (missing credentials, access denied) can
# escape fsspec untranslated: they are storage errors, not bugs of ckpt.
_STORAGE_MODULES = ("botocore", "aiobotocore", "boto3", "s3fs", "gcsfs", "google", "adlfs", "azure", "fsspec",
                    "aiohttp", "requests", "urllib3", "huggingface_hub", "ossfs", "ocifs")


def _from_storage_backend(exc: BaseException) -> bool:
    return any(
        (cls.__module__ or "").split(".")[0] in _STORAGE_MODULES for cls in type(exc).__mro__
    )


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an exception that ended a command."""
    if isinstance(exc, (UsageError, CheckpointNotFoundError, CheckpointExistsError, UnsupportedValueError)):
        return EXIT_USAGE
    if isinstance(exc, (FormatError, CorruptCheckpointError, ManifestError)):
        return EXIT_CORRUPT
    if isinstance(exc, (StorageError, CommitError, OSError)) or _from_storage_backend(exc):
        return EXIT_STORAGE
    if isinstance(exc, (CkptError, ValueError)):
        return EXIT_USAGE
    return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    """Run the ``ckpt`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        _err(str(e))
        return EXIT_USAGE
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else EXIT_OK
    for name, default in (("debug", False), ("progress", False), ("storage_option", [])):
        if not hasattr(args, name):
            setattr(args, name, default)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:  # `ckpt ls | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return EXIT_OK
    except Exception as e:  # noqa: BLE001 - every error becomes one line and an exit code
        code = exit_code_for(e)
        if args.debug:
            traceback.print_exc()
        if code == EXIT_INTERNAL:
            _err(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback and report it)")
        elif code == EXIT_STORAGE and not isinstance(e, (CkptError, OSError)):
            _err(f"storage error: {type(e).__name__}: {e} (check the URL, credentials and --storage-option)")
        else:
            _err(str(e) or type(e).__name__)
        return code
