"""Assertions shared by the multi-process integration tests: bit-exact tensors, and who wrote what."""

from __future__ import annotations

import itertools
from collections import defaultdict

import torch

import ckpt
from ckpt import format as fmt


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def not_bits(t: torch.Tensor) -> torch.Tensor:
    """Every bit of ``t`` flipped (bools negated): a destination that a load must fully overwrite."""
    if t.dtype == torch.bool:
        return ~t
    return (~_bytes(t)).view(t.dtype).reshape(t.shape).clone()


def assert_bitexact(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    shape, want = tuple(actual.shape), tuple(expected.shape)
    assert shape == want, f"{what}: shape {shape}, expected {want}"
    a, e = _bytes(actual), _bytes(expected)
    if not torch.equal(a, e):
        bad = (a != e).nonzero().flatten()
        raise AssertionError(
            f"{what}: {bad.numel()} of {a.numel()} bytes differ (first at byte {int(bad[0])}); "
            f"got {actual.flatten()[:8].tolist()}..., expected {expected.flatten()[:8].tolist()}..."
        )


def chunk_writers(url: str, step: int) -> tuple[ckpt.Manifest, dict[tuple[str, tuple[int, ...]], list[str]]]:
    """The committed manifest, and for every chunk recorded in any writer's fragment, its writers."""
    manifest, owners, _where = _recorded(url, step)
    return manifest, owners


def _recorded(url: str, step: int) -> tuple[ckpt.Manifest, dict, dict]:
    storage = ckpt.open_storage(url)
    manifest = ckpt.read_manifest(storage, step)
    owners: dict[tuple[str, tuple[int, ...]], list[str]] = defaultdict(list)
    where: dict[tuple[str, tuple[int, ...]], tuple[str | None, int]] = {}  # (pack or None, end byte)
    for writer in manifest.writers:
        frag = fmt.read_fragment(storage, step, writer)
        for path, records in frag.chunks.items():
            for rec in records:
                owners[(path, tuple(rec.index))].append(writer)
                pack = frag.packs[rec.pack] if rec.pack is not None else None
                where[(path, tuple(rec.index))] = (pack, (rec.offset or 0) + rec.nbytes)
    return manifest, dict(owners), where


def assert_each_chunk_written_once(url: str, step: int) -> tuple[ckpt.Manifest, dict[str, set[str]]]:
    """Every chunk of every array has exactly one writer in the fragments, and is in storage.

    Returns the manifest and, per array, the set of writers that wrote any of its chunks.
    """
    manifest, owners, where = _recorded(url, step)
    storage = ckpt.open_storage(url)
    files = storage.walk(fmt.step_dir(step))
    problems = []
    writers_of: dict[str, set[str]] = {}
    for path, spec in manifest.arrays.items():
        expected = set(itertools.product(*(range(g) for g in spec.grid_shape)))
        recorded = {i for (p, i) in owners if p == path}
        if recorded != expected:
            problems.append(f"{path}: chunks recorded {sorted(recorded)}, grid has {sorted(expected)}")
        for index in expected:
            who = owners.get((path, index), [])
            if len(who) != 1:
                problems.append(f"{path}: chunk {index} written by {who}, expected exactly one writer")
            pack, end = where.get((path, index), (None, 0))
            if manifest.layout == "shards":  # consolidated: every chunk in its array's shard
                from ckpt.layouts import shard_key

                if shard_key(spec) not in files:
                    problems.append(f"{path}: shard {shard_key(spec)} missing from storage")
                continue
            if manifest.layout == "packs":  # in its writer's pack, which is long enough for it
                size = files.get(f"{fmt.PACKS}/{pack}")
                if size is None or size < end:
                    problems.append(f"{path}: chunk {index} not in storage (pack {pack}: {size} bytes, needs {end})")
                continue
            sep = spec.chunk_separator
            key = f"{path}/c{sep}" + sep.join(map(str, index)) if index else f"{path}/c"
            if key not in files:
                problems.append(f"{path}: chunk file {key} missing from storage")
        writers_of[path] = {w for (p, _i), ws in owners.items() if p == path for w in ws}
    stray = {p for (p, _i) in owners} - set(manifest.arrays)
    if stray:
        problems.append(f"fragments record chunks of arrays not in the manifest: {sorted(stray)}")
    assert not problems, "\n".join(problems)
    return manifest, writers_of
