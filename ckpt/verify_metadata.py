"""The documents of a committed step, checked against its manifest (part of ``ckpt verify``).

:func:`check_metadata` compares the commit point's consolidated metadata and every array's
(and intermediate group's) ``zarr.json`` with what the manifest implies. :func:`read_fragments`
reads every writer's fragment and checks that it belongs to this save; :func:`recorded_chunks`
then says which writer recorded each chunk, finding chunks recorded twice or off the grid.
:mod:`ckpt.verify` checks the chunks themselves against these records.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import format as fmt
from .errors import CkptError, FormatError, StorageError
from .manifest import MANIFEST_KEY, ChunkRecord, Fragment, Manifest
from .storage import Storage
from .verify_report import (
    DUPLICATE,
    FRAGMENT,
    METADATA,
    MISSING,
    OUTSIDE,
    UNREADABLE,
    Problem,
    chunk_name,
    chunk_problem,
)


def _normalized(doc: Any) -> Any:
    """``doc`` as it reads back from JSON (tuples become lists, ...), for comparisons."""
    return json.loads(fmt.dumps(doc))


# ---------------------------------------------------------------------------------------------
# Metadata


def read_json(storage: Storage, key: str) -> tuple[Any, str | None, str]:
    """(document, None, "") or (None, problem kind, description)."""
    try:
        data = storage.read(key)
    except FileNotFoundError:
        return None, MISSING, "missing"
    except StorageError:
        raise
    except OSError as e:
        return None, UNREADABLE, f"unreadable ({e})"
    try:
        return json.loads(data), None, ""
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return None, METADATA, f"not valid JSON ({e})"


# Fields of an array's zarr.json that must agree with the manifest. The layout description
# in its attributes is informational and comes from whichever writer wrote the file.
_ARRAY_FIELDS = ("zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding",
                 "fill_value", "codecs")


def _array_doc_differences(have: Any, want: dict, layout: Any = None) -> list[str]:
    """What differs between an array's ``zarr.json`` and the manifest; ``layout``: the layout
    description the array's metadata writer declared (None: not checked)."""
    if not isinstance(have, dict):
        return [f"expected a JSON object, found {type(have).__name__}"]
    out = [f"{f} is {have.get(f)!r}, the manifest says {want[f]!r}" for f in _ARRAY_FIELDS if have.get(f) != want[f]]
    extra = sorted(set(have) - set(want))
    if extra:
        out.append(f"unexpected field(s) {extra}")
    attrs = have.get("attributes")
    if isinstance(attrs, dict) and set(attrs) != set(want["attributes"]):
        out.append(f"attributes are {sorted(attrs)}, expected {sorted(want['attributes'])}")
    meta = attrs.get(MANIFEST_KEY) if isinstance(attrs, dict) else None
    if isinstance(meta, dict) and set(meta) != {"dtype", "layout"}:
        out.append(f"attributes.{MANIFEST_KEY} has fields {sorted(meta)}, expected ['dtype', 'layout']")
    if layout is not None and isinstance(meta, dict) and _normalized(meta.get("layout")) != _normalized(layout):
        out.append(f"attributes.{MANIFEST_KEY}.layout is {meta.get('layout')!r}, its writer declared {layout!r}")
    attrs = have.get("attributes")
    got_dtype = attrs.get(MANIFEST_KEY, {}).get("dtype") if isinstance(attrs, dict) and isinstance(
        attrs.get(MANIFEST_KEY), dict) else None
    want_dtype = want["attributes"][MANIFEST_KEY]["dtype"]
    if got_dtype != want_dtype:
        out.append(f"attributes.{MANIFEST_KEY}.dtype is {got_dtype!r}, the manifest says {want_dtype!r}")
    return out


def check_metadata(storage: Storage, step: int, manifest: Manifest, root: dict,
                    layouts: dict[str, Any] | None = None) -> list[Problem]:
    sdir = fmt.step_dir(step)
    problems: list[Problem] = []
    if manifest.layout == "packs":
        # Chunks live in packs: no zarr documents are written (a zarr reader sees an empty group).
        if root.get("consolidated_metadata") is not None:
            problems.append(Problem(METADATA, f"{fmt.META}: a packs step lists arrays as consolidated metadata, "
                                    "zarr readers would read fill values", key=fmt.META))
        return problems
    shards = manifest.layout == "shards"
    consolidated = root.get("consolidated_metadata")
    entries = consolidated.get("metadata") if isinstance(consolidated, dict) else None
    if not isinstance(entries, dict):
        problems.append(Problem(METADATA, f"{fmt.META}: consolidated metadata missing or malformed", key=fmt.META))
        entries = None
    groups = sorted({"/".join(p.split("/")[:i]) for p in manifest.arrays for i in range(1, p.count("/") + 1)})
    for path, spec in manifest.arrays.items():
        try:
            want = _normalized(fmt.zarr_array_document(spec, shards=shards))
        except CkptError as e:  # unknown dtype name in the manifest
            problems.append(Problem(METADATA, f"tensor {path!r}: {e}", path))
            continue
        if entries is not None:
            diffs = _array_doc_differences(entries.get(path), want) if path in entries else ["no entry"]
            for d in diffs:
                problems.append(Problem(METADATA, f"tensor {path!r}: consolidated metadata in {fmt.META}: {d}",
                                        path, key=fmt.META))
        key = f"{path}/{fmt.META}"
        doc, kind, what = read_json(storage, f"{sdir}/{key}")
        if kind is not None:
            problems.append(Problem(kind, f"tensor {path!r}: array metadata {key} {what}", path, key=key))
            continue
        for d in _array_doc_differences(doc, want, (layouts or {}).get(path)):
            problems.append(Problem(METADATA, f"tensor {path!r}: array metadata {key}: {d}", path, key=key))
    for g in groups:
        key = f"{g}/{fmt.META}"
        doc, kind, what = read_json(storage, f"{sdir}/{key}")
        if kind is None and doc != fmt.group_document():  # intermediate groups are always this document
            kind, what = METADATA, f"is not the zarr group document {fmt.group_document()} ({doc!r})"
        if kind is not None:
            problems.append(Problem(kind, f"group {g!r}: metadata {key} {what}", key=key))
    return problems


def read_fragments(
    storage: Storage, step: int, manifest: Manifest, threads: int
) -> tuple[list[Fragment], list[Problem]]:
    def one(writer: str) -> Fragment | Problem:
        key = fmt.fragment_path(step, writer).split("/", 1)[1]
        try:
            frag = fmt.read_fragment(storage, step, writer)
        except FileNotFoundError:
            return Problem(FRAGMENT, f"fragment of writer {writer} ({key}) is missing", key=key, writer=writer)
        except FormatError as e:
            return Problem(FRAGMENT, f"fragment of writer {writer} ({key}) is unreadable: {e}", key=key, writer=writer)
        except StorageError:
            raise
        except OSError as e:
            return Problem(UNREADABLE, f"fragment of writer {writer} ({key}) is unreadable: {e}", key=key,
                           writer=writer)
        if frag.step != step or frag.save_id != manifest.save_id or frag.writer != writer:
            return Problem(
                FRAGMENT,
                f"fragment of writer {writer} ({key}) belongs to another save (step {frag.step}, save "
                f"{frag.save_id}, writer {frag.writer}; the manifest says step {step}, save {manifest.save_id})",
                key=key, writer=writer,
            )
        return frag

    if not manifest.writers:
        return [], []
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(manifest.writers)))) as pool:
        results = list(pool.map(one, manifest.writers))
    return [r for r in results if isinstance(r, Fragment)], [r for r in results if isinstance(r, Problem)]


def recorded_chunks(
    manifest: Manifest, fragments: list[Fragment]
) -> tuple[dict[tuple[str, tuple[int, ...]], tuple[str, ChunkRecord]], list[Problem]]:
    """Which writer recorded each chunk; problems for duplicates and records off the grid."""
    owner: dict[tuple[str, tuple[int, ...]], tuple[str, ChunkRecord]] = {}
    problems: list[Problem] = []
    for frag in fragments:
        for path, records in frag.chunks.items():
            spec = manifest.arrays.get(path)
            for rec in records:
                if spec is None:
                    problems.append(Problem(
                        OUTSIDE, f"writer {frag.writer} recorded chunk {chunk_name(rec.index)} of tensor {path!r}, "
                        "which the manifest does not have", path, rec.index, writer=frag.writer))
                    continue
                grid = spec.grid_shape
                if len(rec.index) != len(grid) or any(not 0 <= i < g for i, g in zip(rec.index, grid)):
                    problems.append(Problem(
                        OUTSIDE, f"tensor {path!r} chunk {chunk_name(rec.index)}: writer {frag.writer} recorded "
                        f"it, but it lies outside the chunk grid {list(grid)}", path, rec.index, writer=frag.writer))
                    continue
                have = owner.get((path, rec.index))
                if have is not None:
                    problems.append(chunk_problem(
                        DUPLICATE, spec, rec.index, f"recorded by both {have[0]} and {frag.writer}", frag.writer))
                    continue
                owner[(path, rec.index)] = (frag.writer, rec)
    return owner, problems
