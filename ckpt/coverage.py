"""What a committer checks of the fragments of a save before it writes the commit point, and
what it derives from them: pure functions over fragments, no I/O.

- every writer agrees on each array's shape, dtype and chunk grid;
- every chunk of every array is written exactly once, nothing outside the grid;
- which writer holds which chunk, as the runs the commit point records for a packs step.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from .layouts import Run, encode_runs, linear_index
from .manifest import ArraySpec, Fragment


def check_specs(fragments: Sequence[Fragment]) -> tuple[dict[str, ArraySpec], list[str]]:
    arrays: dict[str, ArraySpec] = {}
    first_by: dict[str, str] = {}
    problems = []
    for frag in fragments:
        for path, spec in frag.arrays.items():
            have = arrays.get(path)
            if have is None:
                arrays[path] = spec
                first_by[path] = frag.writer
            elif (have.shape, have.dtype, have.chunk_shape) != (spec.shape, spec.dtype, spec.chunk_shape):
                problems.append(
                    f"{path!r}: writer {first_by[path]} declares shape {list(have.shape)} {have.dtype} "
                    f"chunks {list(have.chunk_shape)}, writer {frag.writer} declares shape "
                    f"{list(spec.shape)} {spec.dtype} chunks {list(spec.chunk_shape)} (if ranks hold "
                    "different slices of this tensor, declare its layout with ckpt.Sharded or a DTensor)"
                )
    return arrays, problems


def check_coverage(arrays: dict[str, ArraySpec], fragments: Sequence[Fragment]) -> list[str]:
    """Every chunk of every array written exactly once, nothing outside the grid."""
    problems = []
    owner: dict[tuple[str, tuple[int, ...]], str] = {}
    for frag in fragments:
        for path, records in frag.chunks.items():
            spec = arrays.get(path)
            if spec is None:
                problems.append(f"writer {frag.writer} wrote chunks of undeclared array {path!r}")
                continue
            grid = spec.grid_shape
            for rec in records:
                if len(rec.index) != len(grid) or any(not (0 <= i < g) for i, g in zip(rec.index, grid)):
                    problems.append(f"{path!r}: chunk {list(rec.index)} outside the grid {list(grid)}")
                    continue
                key = (path, rec.index)
                if key in owner:
                    problems.append(
                        f"{path!r}: chunk {list(rec.index)} written by both {owner[key]} and {frag.writer}"
                    )
                owner[key] = frag.writer
    written = Counter(p for p, _i in owner)
    for path, spec in arrays.items():
        have = written[path] if spec.num_chunks else 0
        if have != spec.num_chunks:
            problems.append(f"{path!r}: {spec.num_chunks - have} of {spec.num_chunks} chunks not written by any writer")
    return problems


def intermediate_groups(paths: Iterable[str]) -> list[str]:
    groups = set()
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            groups.add("/".join(parts[:i]))
    return sorted(groups)


def writer_runs(arrays: Mapping[str, ArraySpec], fragments: Sequence[Fragment],
                writers: Sequence[str]) -> dict[str, tuple[Run, ...]]:
    """Which writer holds which chunk of each array, as runs (see ``Manifest.writer_runs``)."""
    index = {w: i for i, w in enumerate(writers)}
    owners: dict[str, list[int]] = {p: [0] * a.num_chunks for p, a in arrays.items()}
    for frag in fragments:
        w = index[frag.writer]
        for path, recs in frag.chunks.items():
            own = owners[path]
            spec = arrays[path]
            for r in recs:
                own[linear_index(spec, r.index)] = w
    return {p: encode_runs(o) for p, o in owners.items() if o}
