"""Fuzz the parsers of untrusted checkpoint metadata (hypothesis, bounded): the manifest and
fragment parsers, the agent's plan decoder, and whole commit points read by load, verify and
the CLI. Anything may be refused, with a ``ckpt`` error; nothing may crash with another
exception, and the CLI never reports an internal error."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt
from ckpt import format as fmt
from ckpt.cli import EXIT_INTERNAL
from ckpt.cli import main as cli
from ckpt.manifest import ArraySpec, ChunkRecord, Fragment, Manifest, ManifestError
from ckpt.verify import verify_step

EXAMPLES = int(os.environ.get("CKPT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

json_scalars = st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**400) \
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12) \
    | st.sampled_from(["float32", "bfloat16", "bool", "int64", "float8_e4m3fn", "Tensor", "..", "../x", "/abs", "c", "",
                       "ckpt", "group", "array", "w", "model/w"])
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8) | st.sampled_from(
                               ["shape", "dtype", "chunk_shape", "path", "arrays", "writers", "values", "step"]),
                               inner, max_size=4), max_leaves=20)


def _valid_manifest_dict() -> dict:
    spec = ArraySpec(path="model/w", shape=(4, 6), dtype="float32", chunk_shape=(2, 6), chunk_separator=".")
    return Manifest(step=3, save_id="s", created_at=1.0, writers=("rank00000",), arrays={"model/w": spec},
                    values={"v": 1}).to_dict()


def _mutate(doc, data):
    """Replace one field somewhere in ``doc`` by random JSON (or delete it)."""
    node = doc
    while True:
        if isinstance(node, dict) and node:
            key = data.draw(st.sampled_from(sorted(node, key=str)))
        elif isinstance(node, list) and node:
            key = data.draw(st.integers(0, len(node) - 1))
        else:
            return
        child = node[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        if isinstance(node, dict) and data.draw(st.integers(0, 4)) == 0:
            del node[key]
        else:
            node[key] = data.draw(json_values)
        return


def _valid_fragment_dict() -> dict:
    """A writer's fragment of format 4: two arrays, three chunks in one pack (columns)."""
    w = ArraySpec(path="model/w", shape=(4, 6), dtype="float32", chunk_shape=(2, 6), chunk_separator=".")
    b = ArraySpec(path="model/b", shape=(3,), dtype="float32", chunk_shape=(3,), chunk_separator=".")
    chunks = {"model/w": (ChunkRecord(index=(0, 0), nbytes=52, crc32c=7, pack=0, offset=0),
                          ChunkRecord(index=(1, 0), nbytes=52, crc32c=8, pack=0, offset=52)),
              "model/b": (ChunkRecord(index=(0,), nbytes=16, crc32c=9, pack=0, offset=104),)}
    return Fragment(step=3, save_id="s", writer="rank00000", created_at=1.0, arrays={"model/w": w, "model/b": b},
                    chunks=chunks, values={"v": 1}, packs=("rank00000.0",)).to_dict()


@FUZZ
@given(st.data())
def test_manifest_and_fragment_parsers_raise_only_manifest_errors(data):
    doc = data.draw(json_values | st.sampled_from([_valid_manifest_dict, _valid_fragment_dict]).map(
        lambda make: json.loads(json.dumps(make()))))
    for _ in range(data.draw(st.integers(0, 3))):
        _mutate(doc, data)
    for parse in (Manifest.from_dict, Fragment.from_dict, lambda d: Fragment.from_dict(d, records=False),
                  lambda d: ArraySpec.from_dict(d), fmt.fragment_locations):
        try:
            parse(doc)
        except ManifestError:
            pass


@FUZZ
@given(st.data())
def test_agent_plan_decoder_raises_only_plan_errors(data):
    from agent.errors import PlanError
    from agent.plan import decode_plan

    doc = {"version": 1, "arrays": [_valid_manifest_dict()["arrays"][0]], "metadata": ["model/w"], "values": {},
           "tensors": [[0, "float32", [4, 6]]], "requests": [["model/w", [0, 0], 0, [[0, 2], [0, 6]], [2, 6]]]}
    for _ in range(data.draw(st.integers(1, 3))):
        _mutate(doc, data)
    try:
        decode_plan(json.dumps(doc), torch.zeros(96, dtype=torch.uint8))
    except PlanError:
        pass


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzrun")
    # One file per chunk: the commit point then also holds the consolidated zarr metadata to mutate.
    ckpt.save({"model": {"w": torch.arange(24.0).reshape(4, 6)}, "v": 1}, str(root), step=3, max_chunk_bytes=48,
              layout="chunks")
    return root


@FUZZ
@given(st.data())
def test_load_verify_and_cli_on_a_mutated_commit_point(run_dir, data):
    """A well-formed (checksummed) commit point with any content: a buggy or hostile writer."""
    path = run_dir / fmt.step_dir(3) / fmt.META
    pristine = path.read_bytes()
    try:
        root = json.loads(pristine)
        root["attributes"].pop(fmt.SEAL_KEY)
        target = data.draw(st.sampled_from(["manifest", "root", "consolidated"]))
        sub = {"manifest": root["attributes"]["ckpt"], "root": root, "consolidated": root["consolidated_metadata"]}
        for _ in range(data.draw(st.integers(1, 3))):
            _mutate(sub[target], data)
        try:
            body = fmt.dumps(fmt.seal_root(root) if isinstance(root.get("attributes"), dict) else root)
        except ValueError:
            return
        path.write_bytes(body)
        storage = ckpt.open_storage(str(run_dir))
        for action in (
            lambda: ckpt.load({"model": {"w": torch.zeros(4, 6)}, "v": 0}, storage, step=3),
            lambda: ckpt.load({"model": {"w": torch.zeros(4, 6)}}, storage, strict=False),
            lambda: verify_step(storage, 3),
            lambda: ckpt.read_manifest(storage),
        ):
            try:
                action()
            except ckpt.CkptError:
                pass
        for argv in (["inspect", str(run_dir)], ["verify", str(run_dir)], ["ls", str(run_dir)],
                     ["inspect", str(run_dir), "--json"]):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                code = cli(argv)
            assert code != EXIT_INTERNAL, err.getvalue()
    finally:
        path.write_bytes(pristine)


def _mutated(base: bytes, data, flips: bytes, inserts: list[bytes]) -> bytearray:
    """``base`` with 1 to 3 bytes flipped to one of ``flips``, runs cut, or ``inserts`` put in."""
    raw = bytearray(base)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            raw[at] = data.draw(st.sampled_from(flips))
        elif op == "cut":
            del raw[at:at + data.draw(st.integers(1, 8))]
        else:
            raw[at:at] = data.draw(st.sampled_from(inserts))
    return raw


@FUZZ
@given(st.data())
def test_the_fragment_reader_reads_what_json_reads(data):
    """``jsondocs.loads_fragment`` parses declarations it has seen before as text: on any bytes it
    returns what ``json.loads`` returns, or raises ``FormatError`` where json fails."""
    from ckpt import jsondocs
    from ckpt.errors import FormatError

    base = fmt.dumps(fmt.seal_fragment(_valid_fragment_dict()))
    jsondocs.loads_fragment(base, "f")  # its declarations known
    raw = _mutated(base, data, b'",:[]{}0123456789abc \\', [b'"arrays":[]', b',"arrays":[],', b'{}', b'[1]', b'\\"'])
    if data.draw(st.integers(0, 9)) == 0:  # a second "arrays" member, last: json keeps it
        raw[-1:] = b',"arrays":[]}'
    try:
        expected = json.loads(bytes(raw))
    except ValueError:
        with pytest.raises(FormatError):
            jsondocs.loads_fragment(bytes(raw), "f")
        return
    assert jsondocs.loads_fragment(bytes(raw), "f") == expected


def _reseal(raw: bytes) -> bytes:
    """``raw`` with its commit point's seal made to match its bytes again (a writer's own doing)."""
    import re

    import crc32c

    seal = b',"' + fmt.SEAL_KEY.encode() + b'":'
    at = raw.rfind(seal)
    m = re.compile(rb"\d{1,10}").match(raw, at + len(seal)) if at >= 0 else None
    if m is None:
        return raw
    return raw[:m.start()] + str(crc32c.crc32c(raw[m.end():], crc32c.crc32c(raw[:at]))).encode() + raw[m.end():]


@pytest.fixture(scope="module")
def packs_step(tmp_path_factory):
    """A packs step (writer runs in its commit point) of a state of mixed shapes and dtypes."""
    root = tmp_path_factory.mktemp("fuzzdirect")
    state = {"model": {f"l{i}.w": torch.randn(3, i + 1) for i in range(6)}, "norm": torch.ones(5, dtype=torch.bfloat16),
             "step": torch.tensor(7), "v": {"lr": 0.5}}
    with ckpt.Checkpointer(str(root), keep_last=None, consolidate="never") as c:
        c.save(3, state, force=True).result(60)
    return (root / fmt.step_dir(3) / fmt.META).read_bytes(), state


@FUZZ
@given(st.data())
def test_the_one_pass_restore_takes_declarations_as_text_only_where_json_reads_them_so(packs_step, data):
    """``ckpt.direct._declarations`` compares the declarations a state implies with a commit
    point's as text: on any bytes (sealed again after the change, as a writer would), when it
    takes them, ``json.loads`` reads that very document: the same declarations and the same
    manifest around them."""
    from ckpt import direct
    from ckpt.state import flatten

    pristine, state = packs_step
    leaves = [(p, t) for p, t, is_tensor in flatten(state) if is_tensor]
    declared = json.loads(pristine)["attributes"]["ckpt"]["arrays"]
    raw = _mutated(pristine, data, b'",:[]{}0123456789abc \\.',
                   [b',"writer_runs":{}', b',"arrays":[]', b'{}', b'"x"', b'}', b'{', b',"k":1', b'\\"'])
    body = _reseal(bytes(raw)) if data.draw(st.integers(0, 9)) else bytes(raw)
    taken = direct._declarations(body, leaves, "")
    if taken is None:
        return
    doc = json.loads(body)  # taken: it is JSON, and these are its declarations and manifest
    manifest = doc["attributes"]["ckpt"]
    assert manifest["arrays"] == declared
    assert {k: v for k, v in manifest.items() if k not in ("arrays", "writer_runs")} == \
           {k: v for k, v in taken[0].items() if k not in ("arrays", "writer_runs")}
