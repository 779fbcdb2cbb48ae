"""``ckpt verify``: every chunk and every document of one step, or of every committed step.

The checks are :func:`ckpt.verify.verify_step`'s; this command sizes one progress bar for all
the steps it verifies, prints every problem, and exits 1 when there is any. ``--all`` skips
incomplete steps (they do not exist for readers) and says so.
"""

from __future__ import annotations

import argparse
import sys

from .. import format as fmt
from ..errors import CkptError
from .common import EXIT_OK, EXIT_PROBLEMS, format_bytes, open_url, print_json, progress_bar, resolve_step


def cmd_verify(args: argparse.Namespace) -> int:
    from ..verify import step_nbytes, verify_step

    storage = open_url(args.run, args)
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
    with progress_bar(args, total or None, "verify") as bar:
        for s in steps:
            reports.append(verify_step(storage, s, threads=args.threads, progress=bar.update))
    bad = sum(len(r.problems) for r in reports)
    if args.json:
        print_json({
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
