"""S3 for real: s3fs against a local S3 server (moto's server mode) started by the test on
loopback. Several writer processes save the shards of each checkpoint concurrently while a
reader polls: the reader only ever sees whole committed checkpoints (the commit point is one
PUT). A writer killed mid-save leaves an invisible step that ``ckpt gc`` removes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt.verify import verify_step

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

from .s3_server import moto_endpoint, s3_options  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORLD = 3
STEPS = 6


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_endpoint("ckpt-conc") as endpoint:
        yield endpoint


def full_at(step: int) -> torch.Tensor:
    return torch.arange(WORLD * 10 * 64, dtype=torch.float32).reshape(WORLD * 10, 64) * (step + 1)


WRITER = textwrap.dedent('''
    import json, sys, torch, ckpt
    from ckpt.commit import wait_for_fragments
    endpoint, url, rank, world, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    opts = {"key": "test", "secret": "test", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    st = ckpt.open_storage(url, storage_options=opts)
    writers = [ckpt.format.writer_name(r) for r in range(world)]
    for step in range(steps):
        full = torch.arange(world * 10 * 64, dtype=torch.float32).reshape(world * 10, 64) * (step + 1)
        state = {"w": ckpt.Sharded(full.chunk(world)[rank].clone(), dim=0, rank=rank, world=world),
                 "meta": {"step": step}}
        plan = ckpt.plan_save(state, rank=rank, world=world, max_chunk_bytes=512)
        ckpt.write_plan(st, plan, step=step, writer=writers[rank], save_id=f"save-{step}")
        if rank == 0:
            wait_for_fragments(st, step, f"save-{step}", writers[1:], timeout_s=120, poll_s=0.02)
            ckpt.commit(st, step, writers, save_id=f"save-{step}")
        print(json.dumps({"rank": rank, "step": step}), flush=True)
''')

SAVER = textwrap.dedent('''
    import sys, torch, ckpt
    endpoint, url = sys.argv[1], sys.argv[2]
    opts = {"key": "test", "secret": "test", "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    for step in range(1000):
        full = torch.arange(30 * 64, dtype=torch.float32).reshape(30, 64) * (step + 1)
        ckpt.save({"w": full, "meta": {"step": step}}, url, step=step, storage_options=opts, max_chunk_bytes=256)
        print(step, flush=True)
''')


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def _load_newest(url: str, opts: dict) -> int | None:
    out = {"w": torch.zeros(WORLD * 10, 64), "meta": {}}
    try:
        step = ckpt.load(out, url, storage_options=opts)
    except ckpt.CheckpointNotFoundError:
        return None
    assert torch.equal(out["w"], full_at(step)) and out["meta"] == {"step": step}, f"step {step} loaded wrong"
    return step


def test_concurrent_writer_processes_and_a_reader_see_only_whole_checkpoints(s3_endpoint, tmp_path):
    url = "s3://ckpt-conc/run-conc"
    opts = s3_options(s3_endpoint)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), s3_endpoint, url, str(r), str(WORLD), str(STEPS)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
             for r in range(WORLD)]
    seen: list[int] = []
    reads = 0
    try:
        while any(p.poll() is None for p in procs):
            step = _load_newest(url, opts)  # while the writers write: whole checkpoints only
            reads += 1
            if step is not None and (not seen or seen[-1] != step):
                assert not seen or step > seen[-1], "the newest committed step went backwards"
                seen.append(step)
            time.sleep(0.05)
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err[-3000:]
            assert [json.loads(line)["step"] for line in out.splitlines()] == list(range(STEPS))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert reads > 0
    storage = ckpt.open_storage(url, storage_options=opts)
    assert ckpt.committed_steps(storage) == list(range(STEPS))
    for s in range(STEPS):
        report = verify_step(storage, s)
        assert report.ok and report.writers == WORLD, [p.message for p in report.problems]
        assert sorted(storage.list_dir(f"{ckpt.format.step_dir(s)}/.fragments")) == [
            f"rank{r:05d}.json" for r in range(WORLD)]
    # one PUT per commit point: no temporary objects, no renames
    assert not [k for s in range(STEPS) for k in storage.walk(ckpt.format.step_dir(s)) if k.endswith(".tmp")]
    assert _load_newest(url, opts) == STEPS - 1


def test_writer_killed_mid_save_on_s3_leaves_an_invisible_step_that_gc_removes(s3_endpoint, tmp_path):
    url = "s3://ckpt-conc/run-kill"
    opts = s3_options(s3_endpoint)
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    p = subprocess.Popen([sys.executable, str(script), s3_endpoint, url], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
    storage = ckpt.open_storage(url, storage_options=opts)
    try:
        # kill it once it has committed a few steps and is in the middle of the next one
        deadline = time.monotonic() + 120
        while True:
            line = p.stdout.readline()
            assert line, p.stderr.read()[-3000:]
            if int(line) >= 3:
                break
            assert time.monotonic() < deadline
        time.sleep(0.15)  # saves follow each other: this lands inside one
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    steps = ckpt.list_steps(storage)
    committed = [s.step for s in steps if s.committed]
    incomplete = [s.step for s in steps if not s.committed]
    assert committed == list(range(len(committed))) and len(committed) >= 4
    assert all(s > committed[-1] for s in incomplete)
    out = {"w": torch.zeros(30, 64), "meta": {}}
    assert ckpt.load(out, url, storage_options=opts) == committed[-1]
    assert torch.equal(out["w"], torch.arange(30 * 64.0).reshape(30, 64) * (committed[-1] + 1))
    for s in incomplete:
        with pytest.raises(ckpt.CheckpointNotFoundError):
            ckpt.load({"w": torch.zeros(30, 64), "meta": {}}, url, step=s, storage_options=opts)
    from ckpt.retention import RetentionPolicy, run_gc

    run_gc(storage, RetentionPolicy(keep_last=2, min_age_s=0))
    assert [(s.step, s.committed) for s in ckpt.list_steps(storage)] == [(s, True) for s in committed[-2:]]
    for s in committed[-2:]:
        assert verify_step(storage, s).ok
