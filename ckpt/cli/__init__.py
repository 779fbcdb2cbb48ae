"""The ``ckpt`` command: list, inspect, verify, reshard, export, import and garbage-collect
checkpoints.

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

The package: :mod:`ckpt.cli.common` (exit codes, output helpers, opening a run), one module
per group of commands (:mod:`~ckpt.cli.browse`: ls, inspect; :mod:`~ckpt.cli.check`: verify;
:mod:`~ckpt.cli.rewrite`: reshard, export; :mod:`~ckpt.cli.bridge`: import, export to DCP and
Hugging Face folders; :mod:`~ckpt.cli.prune`: gc), and here the parser, the mapping of
exceptions to exit codes, and :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

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
from ..manifest import ManifestError
from ..version import __version__
from .bridge import cmd_import
from .browse import cmd_inspect, cmd_ls, layout_summary
from .check import cmd_verify
from .common import (
    EXIT_CODES_HELP,
    EXIT_CORRUPT,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_STORAGE,
    EXIT_USAGE,
    UsageError,
    format_bytes,
    print_error,
    resolve_step,
)
from .prune import cmd_gc
from .rewrite import cmd_consolidate, cmd_export, cmd_reshard


class _Parser(argparse.ArgumentParser):
    """Reports usage errors as exceptions, so ``main`` returns instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------------------------
# Argument types


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
    parser.add_argument("--version", action="version", version=f"ckpt {__version__}")
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

    p = add("export", "export tensors to safetensors, torch.save, a DCP or a Hugging Face folder", cmd_export,
            "Write every tensor of step N with its global shape. safetensors: one file, keyed by path, streamed "
            "block by block. torch: torch.save needs every tensor at once, so tensors are staged in a "
            "memory-mapped temp file beside OUT (needs free disk for twice the output while running; anonymous "
            "memory stays about one block, the mapped pages are reclaimable page cache). Non-tensor values go "
            "into __ckpt_values__ (safetensors metadata, as a JSON string; a dict entry for torch). dcp: a folder "
            "stock dcp.load reads (values included). hf: a Hugging Face folder (model.safetensors, or shards and "
            "model.safetensors.index.json) of the tensors under model/, tied weights once.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--step", type=_nonneg_int, help="step to export (default: newest committed)")
    p.add_argument("--format", choices=["safetensors", "torch", "dcp", "hf"],
                   help="output format (default: from OUT's extension: .safetensors, or .pt/.pth/.bin)")
    p.add_argument("out", metavar="OUT", help="output file, or folder for dcp and hf (local path; a file may be an "
                                              "fsspec URL)")
    p.add_argument("--include", action="append", metavar="GLOB",
                   help="only tensors (and values) whose path matches, repeatable (e.g. 'model/*'; hf: default "
                        "PREFIX*)")
    p.add_argument("--dtype", help="convert floating-point tensors to this dtype (bfloat16, float16, float32, ...)")
    p.add_argument("--strip-prefix", default=None, metavar="PREFIX",
                   help="remove PREFIX from the keys (e.g. 'model/' for a plain model state dict; hf: default "
                        "'model/', '' keeps the paths)")
    p.add_argument("--no-values", action="store_true", help="tensors only: leave out non-tensor values")
    p.add_argument("--max-shard-size", type=_bytes_arg, metavar="SIZE",
                   help="hf: the largest safetensors file (default 5GB; a larger tensor gets a file of its own)")
    p.add_argument("--config", metavar="FILE",
                   help="hf: the model's config.json, copied into the folder (tied weights are found from it; "
                        "default: OUT/config.json, or the config an hf import kept)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="dcp: also write values that ckpt stored pickled (decoding them runs their code)")
    p.add_argument("--buffer-bytes", type=_bytes_arg, default=256 << 20, metavar="BYTES",
                   help="host buffer for one block of one tensor (default 256MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    threads(p)

    p = add("import", "import a DCP or Hugging Face checkpoint as a step of a run", cmd_import,
            "Write the checkpoint SRC (a folder or URL) as committed step N of RUN, bit for bit, then consolidate "
            "it (--layout shards; packs: ckpt-readable only, half the I/O). dcp: a dcp.save folder (.metadata + "
            "__R_N.distcp); its .metadata is unpickled with an allow-list of the globals such a file uses, any "
            "other is refused; tensors are read with torch.load(weights_only=True); values become JSON, or stay "
            "opaque bytes that need allow_pickle to read. hf: a save_pretrained folder (model.safetensors, or "
            "shards named by model.safetensors.index.json); tensors become PREFIX<name>, tied weights are written "
            "under every name model.state_dict() has. A failure leaves nothing behind.", json_flag=False)
    isub = p.add_subparsers(dest="source_format", metavar="FORMAT", parser_class=_Parser)
    isub.required = True
    for form, text in (("dcp", "a torch.distributed.checkpoint folder"), ("hf", "a Hugging Face save_pretrained folder")):
        q = isub.add_parser(form, help=text, description=p.description, parents=[_common(True)],
                            epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
        q.set_defaults(func=cmd_import)
        q.add_argument("src", metavar="SRC", help=f"{text} (local path or fsspec URL)")
        q.add_argument("run", metavar="RUN")
        q.add_argument("--step", type=_nonneg_int, required=True, help="the step number to write")
        q.add_argument("--layout", choices=["shards", "packs"], default="shards",
                       help="shards (default): consolidated, any zarr v3 reader opens it; packs: read by ckpt")
        q.add_argument("--overwrite", action="store_true", help="replace a committed step of the same number")
        q.add_argument("--max-chunk-bytes", type=_bytes_arg, metavar="BYTES", help="largest chunk (default 16MiB)")
        q.add_argument("--buffer-bytes", type=_bytes_arg, default=256 << 20, metavar="BYTES",
                       help="host buffer for one block of one tensor (default 256MiB)")
        threads(q)
        if form == "hf":
            q.add_argument("--prefix", default="model/", help="prefix of the array paths (default 'model/')")
            q.add_argument("--no-tied", action="store_true",
                           help="write only the tensors the folder holds (not the tied names it left out)")

    p = add("consolidate", "make a step readable by any zarr v3 reader", cmd_consolidate,
            "Rewrite step N (default: the newest committed; --all: every committed step) from per-writer packs "
            "into one zarr v3 array per tensor, each a single shard (zarr's sharding codec): tensorstore and "
            "zarr-python then read it. Safe to interrupt: the commit point is switched in one atomic write, then "
            "the packs are deleted. A step already zarr-readable is left as it is.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--step", type=_nonneg_int, help="step to consolidate (default: newest committed)")
    p.add_argument("--all", action="store_true", help="every committed step")
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
        print_error(str(e))
        return EXIT_USAGE
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else EXIT_OK
    for name, default in (("debug", False), ("progress", False), ("storage_option", [])):
        if not hasattr(args, name):
            setattr(args, name, default)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print_error("interrupted")
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
            print_error(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback and report it)")
        elif code == EXIT_STORAGE and not isinstance(e, (CkptError, OSError)):
            print_error(f"storage error: {type(e).__name__}: {e} (check the URL, credentials and --storage-option)")
        else:
            print_error(str(e) or type(e).__name__)
        return code


__all__ = [
    "EXIT_CODES_HELP",
    "EXIT_CORRUPT",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "EXIT_STORAGE",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "cmd_export",
    "cmd_gc",
    "cmd_import",
    "cmd_inspect",
    "cmd_ls",
    "cmd_reshard",
    "cmd_consolidate",
    "cmd_verify",
    "exit_code_for",
    "format_bytes",
    "layout_summary",
    "main",
    "resolve_step",
]
