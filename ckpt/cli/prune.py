"""``ckpt gc``: delete old committed steps and stale incomplete ones, by a retention policy.

The policy and the deletion are :mod:`ckpt.retention`'s; this command prints each decision
(or, with ``--dry-run``, what it would do) and exits 4 when a step could not be deleted.
"""

from __future__ import annotations

import argparse

from .common import EXIT_OK, EXIT_STORAGE, format_bytes, open_url, print_error, print_json, print_table


def cmd_gc(args: argparse.Namespace) -> int:
    from ..retention import DELETE, RetentionPolicy, run_gc

    policy = RetentionPolicy(keep_last=args.keep_last, keep_every=args.keep_every, min_age_s=args.min_age)
    storage = open_url(args.run, args)
    result = run_gc(storage, policy, dry_run=args.dry_run, clean_tmp=True)
    decisions = result.plan.decisions
    if args.json:
        print_json({"url": storage.url, **result.to_dict()})
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
            print_table(rows, ["ACTION", "STEP", "STATUS", "SIZE", "REASON"])
        gone = result.plan.to_delete
        freed = sum(d.nbytes or 0 for d in gone if args.dry_run or d.step in result.deleted)
        count = len(gone) if args.dry_run else len(result.deleted)
        print(f"{'would delete' if args.dry_run else 'deleted'} {count} step(s), "
              f"{'would free' if args.dry_run else 'freed'} {format_bytes(freed)}")
        if result.stale_tmp:
            print(f"{'would remove' if args.dry_run else 'removed'} {len(result.stale_tmp)} temporary file(s) of "
                  "interrupted writes in kept steps")
    for s, e in result.errors.items():
        print_error(f"could not delete step {s}: {e}")
    return EXIT_STORAGE if result.errors else EXIT_OK
