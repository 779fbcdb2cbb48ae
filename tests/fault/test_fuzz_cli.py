"""Fuzz the ``ckpt`` command line (hypothesis, bounded): random commands, flags and values
against a real run. Every input ends in a documented exit code with, on error, one line on
stderr; none is an internal error (exit 5) or an exception."""

from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt
from ckpt.cli import EXIT_INTERNAL
from ckpt.cli import main as cli

EXAMPLES = int(os.environ.get("CKPT_FUZZ_EXAMPLES", "80"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

COMMANDS = ["ls", "inspect", "verify", "reshard", "export", "gc", "nosuch", "", "--help"]
FLAGS = ["--step", "--all", "--threads", "--json", "--to", "--step-out", "--max-chunk-bytes", "--buffer-bytes",
         "--overwrite", "--format", "--include", "--dtype", "--strip-prefix", "--no-values", "--keep-last",
         "--keep-every", "--min-age", "--dry-run", "--debug", "--progress", "--storage-option", "-h"]
VALUES = ["0", "1", "-1", "3", "99999999999999999999", "1.5", "nan", "inf", "", "x", "whole", "shard:0:2",
          "shard:9:0", "chunks:1KiB", "chunks:0", "chunks:-5", "1GiB", "5EiB", "bfloat16", "complex32", "float8_e4m3fn",
          "torch", "safetensors", "model/*", "[", "30m", "-3h", "1e309", "a=b", "=", "anon=true", "k={\"a\":",
          "\x00", "é", "../..", "memory://fuzz", "nosuch://x", "file:///nonexistent/run"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("clifuzz")
    run = root / "run"
    ckpt.save({"model": {"w": torch.randn(8, 4), "b": torch.randn(4).bfloat16()}, "v": 1}, str(run), step=1,
              max_chunk_bytes=32)
    ckpt.save({"model": {"w": torch.randn(8, 4), "b": torch.randn(4).bfloat16()}, "v": 2}, str(run), step=2)
    (run / "000000000003").mkdir()  # an incomplete step
    return {"run": str(run), "out": str(root / "out"), "outfile": str(root / "o.safetensors"),
            "pt": str(root / "o.pt"), "missing": str(root / "missing"), "file": str(run / "000000000001" / "zarr.json")}


def _argv(data, paths) -> list[str]:
    argv = [data.draw(st.sampled_from(COMMANDS))]
    positional = st.sampled_from(sorted(paths.values())) | st.sampled_from(VALUES)
    for _ in range(data.draw(st.integers(0, 6))):
        kind = data.draw(st.integers(0, 3))
        if kind == 0:
            argv.append(data.draw(positional))
        elif kind == 1:
            argv.append(data.draw(st.sampled_from(FLAGS)))
        elif kind == 2:
            argv += [data.draw(st.sampled_from(FLAGS)), data.draw(st.sampled_from(VALUES) | st.text(max_size=6))]
        else:
            argv.append(data.draw(st.text(max_size=8)))
    return [a for a in argv if a != ""] if data.draw(st.booleans()) else argv


@FUZZ
@given(st.data())
def test_any_command_line_ends_in_a_documented_exit_code(paths, data):
    argv = _argv(data, paths)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(argv)
    assert code in (0, 1, 2, 3, 4), (argv, code, err.getvalue())
    assert code != EXIT_INTERNAL
    if code in (2, 3, 4) and "--debug" not in argv:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        assert lines and lines[-1].startswith("ckpt: error:"), (argv, err.getvalue())
    # the run itself is never damaged by a command line (gc may delete, never corrupt)
    storage = ckpt.open_storage(paths["run"])
    for s in ckpt.committed_steps(storage):
        from ckpt.verify import verify_step

        assert verify_step(storage, s).ok, argv
