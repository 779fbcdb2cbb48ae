"""What every ``ckpt`` command shares: exit codes, the usage error, output helpers, opening a
run and choosing its step.

Commands print results on stdout (tables, or JSON with ``--json``), errors as one line
``ckpt: error: ...`` on stderr, and progress bars on stderr when it is a terminal or with
``--progress``. A URL or storage option that cannot be used is a usage error, not a storage
error: the user has to change the command, not retry it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from .. import format as fmt
from ..errors import CheckpointNotFoundError, CkptError, StorageError
from ..storage import Storage, open_storage

# The exit codes documented in ckpt.cli's docstring, `ckpt --help` (EXIT_CODES_HELP) and docs/cli.md.
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


def print_error(message: str) -> None:
    line = " ".join(str(message).split())  # always one line
    print(f"ckpt: error: {line}", file=sys.stderr)


def print_json(obj: Any) -> None:
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


def iso_time(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def print_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def format_dims(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "()"


def short_json(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def progress_bar(args: argparse.Namespace, total: int | None, desc: str) -> Any:
    from tqdm.auto import tqdm

    enabled = bool(getattr(args, "progress", False)) or sys.stderr.isatty()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                disable=not enabled, leave=False)


def parse_storage_options(args: argparse.Namespace) -> dict[str, Any]:
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


def open_url(url: str, args: argparse.Namespace) -> Storage:
    try:
        return open_storage(url, storage_options=parse_storage_options(args))
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
