"""``ckpt ls`` and ``ckpt inspect``: what a run holds, and what one step of it holds.

Both only read: ``ls`` lists every step with its status (committed, incomplete, corrupt),
size, age and number of tensors; ``inspect`` prints one committed step's manifest (tensors
with their shapes, chunking and save-time layout, writers, versions, non-tensor values and
user metadata).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .. import format as fmt
from ..errors import CkptError
from ..manifest import ArraySpec
from .common import (
    EXIT_OK,
    format_bytes,
    format_dims,
    iso_time,
    open_url,
    print_json,
    print_table,
    resolve_step,
    short_json,
)


def cmd_ls(args: argparse.Namespace) -> int:
    from ..retention import format_age, list_run

    storage = open_url(args.run, args)
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
            "layout": s.layout,
            "zarr_readable": None if s.layout is None else s.layout != "packs",
            "error": s.error,
        })
    if args.json:
        print_json(rows)
    elif rows:
        print_table(
            [[str(r["step"]), r["status"], format_bytes(r["bytes"]), format_age(r["age_s"]),
              "-" if r["zarr_readable"] is None else ("yes" if r["zarr_readable"] else "no"),
              "-" if r["tensors"] is None else str(r["tensors"])] for r in rows],
            ["STEP", "STATUS", "SIZE", "AGE", "ZARR", "TENSORS"],
        )
        for r in rows:
            if r["error"]:
                print(f"step {r['step']}: {r['error']}", file=sys.stderr)
    if not rows:
        print(f"ckpt: no checkpoint steps in {storage.url}", file=sys.stderr)
    return EXIT_OK


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
    if kind == "imported":
        tied = f" (tied to {layout['tied_to']})" if layout.get("tied_to") else ""
        return f"imported from {layout.get('from', '?')}{tied}"
    if kind == "dcp":
        return "dcp.save"
    if kind == "resharded":
        return f"resharded {layout.get('target')}" + (" (replicated)" if layout.get("replicated") else "")
    return short_json(layout, 60)


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
    storage = open_url(args.run, args)
    step = resolve_step(storage, args.step)
    m = fmt.read_manifest(storage, step)
    tensors = [_array_info(a) for a in m.arrays.values()]
    info = {
        "url": storage.url,
        "step": m.step,
        "save_id": m.save_id,
        "created_at": m.created_at,
        "created": iso_time(m.created_at),
        "format_version": m.format_version,
        "layout": m.layout,
        "zarr_readable": m.layout != "packs",
        "library_versions": m.library_versions,
        "writers": list(m.writers),
        "tensors": tensors,
        "bytes": sum(t["bytes"] or 0 for t in tensors),
        "values": m.values,
        "values_by_writer": fmt.values_by_writer(storage, m),
        "user_metadata": m.user_metadata,
    }
    if args.json:
        print_json(info)
        return EXIT_OK
    from ..retention import format_age

    print(f"step {m.step} of {storage.url}")
    print(f"  committed    {info['created']} ({format_age(time.time() - m.created_at)} ago)")
    print(f"  format       ckpt v{m.format_version}, save id {m.save_id}")
    versions = ", ".join(f"{k} {v}" for k, v in sorted(m.library_versions.items())) or "-"
    print(f"  libraries    {versions}")
    shown = ", ".join(m.writers[:8]) + (f", ... ({len(m.writers) - 8} more)" if len(m.writers) > 8 else "")
    print(f"  writers      {len(m.writers)}: {shown}")
    readable = "yes" if m.layout != "packs" else "no (packs: `ckpt consolidate` makes it so)"
    print(f"  layout       {m.layout}; zarr-readable: {readable}")
    print(f"\ntensors: {len(tensors)}, {format_bytes(info['bytes'])}")
    if tensors:
        print_table(
            [[t["path"], format_dims(t["shape"]), t["dtype"], format_dims(t["chunk_shape"]), str(t["chunks"]),
              t["layout_summary"]] for t in tensors],
            ["PATH", "SHAPE", "DTYPE", "CHUNK", "CHUNKS", "LAYOUT"],
        )
    print(f"\nvalues: {len(m.values)}")
    for k, v in m.values.items():
        print(f"  {k} = {short_json(v)}")
    if info["values_by_writer"]:
        print("\nvalues that differ by writer:")
        for w, d in info["values_by_writer"].items():
            for k, v in d.items():
                print(f"  {w}: {k} = {short_json(v)}")
    if m.user_metadata:
        print("\nuser metadata:")
        for k, v in m.user_metadata.items():
            print(f"  {k} = {short_json(v)}")
    return EXIT_OK
