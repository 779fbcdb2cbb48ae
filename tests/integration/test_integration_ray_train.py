"""ckpt.integrations.ray_train on a real local Ray cluster: Ray Train v2 ``TorchTrainer`` with
CPU workers (gloo), pointer checkpoints, a worker killed with SIGKILL and resumed bit-exactly,
a resume with fewer workers (reshard), and Ray Train as the one owner of retention.

Every test asserts what training ended with and what storage holds, never how long anything took.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt import format as fmt
from tests.helpers import assert_same

ray = pytest.importorskip("ray")
pytest.importorskip("ray.train.torch")

from ckpt.integrations.ray_train import (
    OWNER_FILE,
    POINTER_FILE,
    STEP_METRIC,
    Pointer,
    RayTrainReporter,
    read_pointer,
    steps_to_delete,
)
from ckpt.integrations.ray_train.retention import claim_root

REPO = Path(__file__).resolve().parents[2]
WIDTH, TABLE_ROWS, EVERY = 16, 6, 2


# -- the training function that runs on every Ray Train worker ------------------------------------


def _batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` split over ``world`` ranks: the same samples whatever the world."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(8, WIDTH, generator=g), torch.randn(8, 1, generator=g)
    per = 8 // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


class _Job:
    """The model, optimizer and a row-sharded table of one rank, and its training step."""

    def __init__(self, rank: int, world: int) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.rank, self.world = rank, world
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(), torch.nn.Dropout(0.1), torch.nn.Linear(WIDTH, 1)
        )
        self.ddp = DistributedDataParallel(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        # Sharded by rows across the workers, as an embedding would be: a change of the world
        # size is a real reshard of it.
        self.rows = TABLE_ROWS // world
        self.table = torch.zeros(self.rows, 4)
        # Dropout draws from the global generator: RNGState keeps the resumed run on the same draws.
        self.state = {
            "model": self.model,
            "optim": self.optimizer,
            "rng": ckpt.RNGState(),
            "table": ckpt.Sharded(self.table, dim=0, rank=rank, world=world),
        }

    def step(self, step: int) -> float:
        x, y = _batch(step, self.rank, self.world)
        loss = torch.nn.functional.mse_loss(self.ddp(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.table += (step + 1) * (self.rank * self.rows + torch.arange(self.rows, dtype=torch.float32)).unsqueeze(1)
        return loss.item()

    def final(self) -> dict:
        import torch.distributed as dist

        full = [torch.empty_like(self.table) for _ in range(self.world)]
        dist.all_gather(full, self.table)
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict(), "table": torch.cat(full)}


def train_fn(config: dict) -> None:
    """What every Ray Train worker runs."""
    import ray.train

    context = ray.train.get_context()
    job = _Job(context.get_world_rank(), context.get_world_size())
    ckptr = ckpt.Checkpointer(config["url"], every_n_steps=EVERY, keep_last=None, on_error="raise")
    reporter = RayTrainReporter(ckptr, upload_mode=config.get("upload_mode", "sync"))
    resumed = reporter.restore(job.state, start_from=config.get("start_from"))
    out = Path(config["out"])
    if job.rank == 0:
        with open(out / "starts.jsonl", "a") as f:
            f.write(json.dumps({"start": resumed, "world": job.world}) + "\n")
        if resumed and config.get("dump_restored"):
            torch.save({"model": job.model.state_dict(), "table": job.table.clone()}, out / "restored.pt")
    ckptr.attach(job.optimizer)
    for step in range(resumed or 0, config["steps"]):
        loss = job.step(step)
        ckptr.save(step, job.state)
        if step == config.get("wait_at"):
            ckptr.wait()  # so that this step's report carries a pointer whatever the machine's load
        if step % config.get("report_every", 1) == 0:
            reporter.report(step, {"loss": loss, "step": step})
        if step == config.get("kill_at") and job.rank == 1 and not (out / "killed").exists():
            # Die once Ray Train registered the reports so far (the step-4 pointer): Ray drops
            # a report it had not registered when a worker of the group died.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            (out / "killed").touch()
            os.kill(os.getpid(), signal.SIGKILL)
    reporter.finish()
    ckptr.close()
    final = job.final()
    if job.rank == 0:
        torch.save(final, out / "final.pt")


def _uninterrupted(rank: int, world: int, steps: int) -> dict:
    """The same training on ``world`` plain processes: no Ray, no checkpoint, no failure."""
    job = _Job(rank, world)
    for step in range(steps):
        job.step(step)
    return job.final()


def _baseline(tmp_path: Path, steps: int) -> dict:
    from tests.integration._multiproc import run_distributed

    return run_distributed(_uninterrupted, 2, steps, tmp_path=tmp_path)[0]


def _fit(
    tmp_path: Path,
    tag: str,
    *,
    url: str,
    steps: int,
    workers: int = 2,
    name: str | None = None,
    num_to_keep: int | None = 2,
    **config,
):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path / tag
    out.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"url": url, "out": str(out), "steps": steps, **config},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
        run_config=RunConfig(
            name=name or tag,
            storage_path=str(tmp_path / "ray"),
            failure_config=FailureConfig(max_failures=1),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
        ),
    )
    result = trainer.fit()
    print(f"fit {tag}: {time.perf_counter() - t0:.1f} s")
    return result, out


def _final(out: Path) -> dict:
    return torch.load(out / "final.pt", weights_only=True)


def _starts(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "starts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


# -- on a Ray cluster -----------------------------------------------------------------------------


def _check_run(
    tmp_path: Path, *, steps: int, report_every: int, wait_at: int | None = None, kill_at: int | None = None, **config
) -> None:
    url = str(tmp_path / "ckpt")
    result, out = _fit(
        tmp_path, "run", url=url, steps=steps, wait_at=wait_at, kill_at=kill_at, report_every=report_every, **config
    )
    starts = _starts(out)
    if kill_at is None:
        assert starts == [{"start": None, "world": 2}]
    else:
        assert (out / "killed").exists(), "the worker was not killed"
        assert len(starts) == 2 and starts[0]["start"] is None, starts
        # Resumed from a reported pointer: a checkpoint step committed before the kill.
        # (Pointers are reported oldest first, one per report: which one is the newest at the
        # kill depends on how fast the steps commit; wait_at makes sure there is one.)
        assert starts[1]["start"] in range(1, kill_at + 1, EVERY), starts
    assert_same(_final(out), _baseline(tmp_path, steps))  # weights, Adam state, sharded table: bit-exact

    # Ray ends with the pointer of the last step, and the ckpt run holds exactly what Ray lists.
    last = (steps - 1) // EVERY * EVERY
    storage = ckpt.open_storage(url)
    pointer = read_pointer(result.checkpoint)
    assert pointer == Pointer(url=storage.url, step=last, world_size=2, experiment="run")
    listed = sorted(read_pointer(c).step for c, _ in result.best_checkpoints)
    assert listed == [last - EVERY, last]  # num_to_keep=2
    assert sorted(m[STEP_METRIC] for _, m in result.best_checkpoints) == listed
    assert all(m["step"] == m[STEP_METRIC] for _, m in result.best_checkpoints)  # each with its own metrics
    assert [s.step for s in fmt.list_steps(storage)] == listed  # all committed, nothing else left
    pointer_dirs = sorted(p.name for p in (tmp_path / "ray" / "run").iterdir() if p.name.startswith("ckpt_step_"))
    assert pointer_dirs == [f"ckpt_step_{fmt.step_dir(s)}" for s in listed]
    assert json.loads((tmp_path / "ckpt" / OWNER_FILE).read_text())["experiment"] == "run"


def test_pointers_of_committed_steps_and_ray_owned_retention(cluster, tmp_path):
    # The short version of the test below (one worker group start instead of two): 6 steps,
    # checkpoints 0, 2, 4, Ray keeps 2 of them, and the ckpt run ends holding exactly those.
    _check_run(tmp_path, steps=6, report_every=EVERY)


@pytest.mark.slow
def test_killed_worker_resumes_from_the_pointer_bit_exact(cluster, tmp_path):
    # Reports at checkpoint steps only (each report is a Ray collective): 0, 2, 4 (all saves
    # committed by then: a pointer goes with it) | killed at 5 | resumed after a pointer: ..., finish.
    _check_run(tmp_path, steps=8, wait_at=4, kill_at=5, report_every=EVERY)


@pytest.mark.slow
def test_killed_worker_resumes_bit_exact_reporting_every_step_with_async_upload(cluster, tmp_path):
    _check_run(tmp_path, steps=14, wait_at=4, kill_at=9, report_every=1, upload_mode="async")


@pytest.mark.slow
def test_resume_with_fewer_workers_reshards(cluster, tmp_path):
    url = str(tmp_path / "ckpt")
    _, out2 = _fit(tmp_path, "two", url=url, steps=5, name="run", num_to_keep=None, report_every=EVERY)
    first = _final(out2)
    # Steps 0..4, the last one checkpointed. The same Ray Train run, resumed with 1 worker:
    # Ray hands back step 4's pointer, which holds what the 2 workers ended with.
    result, out1 = _fit(
        tmp_path,
        "one",
        url=url,
        steps=8,
        workers=1,
        name="run",
        num_to_keep=None,
        report_every=EVERY,
        dump_restored=True,
    )
    assert _starts(out1) == [{"start": 5, "world": 1}]
    restored = torch.load(out1 / "restored.pt", weights_only=True)
    assert_same(restored["model"], first["model"])
    assert_same(restored["table"], first["table"])  # 2 shards of 3 rows read back as one of 6
    assert read_pointer(result.checkpoint) == Pointer(
        url=ckpt.open_storage(url).url, step=6, world_size=1, experiment="run"
    )
    assert fmt.committed_steps(ckpt.open_storage(url)) == [0, 2, 4, 6]  # num_to_keep=None: Ray keeps all


@pytest.mark.slow
def test_another_run_is_refused_the_root_and_resumes_from_its_pointer_into_its_own(cluster, tmp_path):
    first_url, own_url = str(tmp_path / "ckpt-first"), str(tmp_path / "ckpt-own")
    first, out = _fit(tmp_path, "first", url=first_url, steps=3, report_every=EVERY)  # steps 0..2: ends at 2
    assert read_pointer(first.checkpoint).step == 2
    with pytest.raises(Exception, match="belongs to the Ray Train run 'first'"):
        _fit(tmp_path, "second", url=first_url, steps=5, report_every=EVERY, start_from=first.checkpoint)
    result, out3 = _fit(
        tmp_path, "third", url=own_url, steps=5, report_every=EVERY, start_from=first.checkpoint, dump_restored=True
    )
    assert _starts(out3) == [{"start": 3, "world": 2}]
    assert_same(torch.load(out3 / "restored.pt", weights_only=True)["model"], _final(out)["model"])
    assert fmt.committed_steps(ckpt.open_storage(first_url)) == [0, 2]  # untouched by the other runs
    assert fmt.committed_steps(ckpt.open_storage(own_url)) == [4]
    assert read_pointer(result.checkpoint) == Pointer(
        url=ckpt.open_storage(own_url).url, step=4, world_size=2, experiment="third"
    )


# -- without a cluster ----------------------------------------------------------------------------


def _infos(*pairs: tuple[int, bool]) -> list[fmt.StepInfo]:
    return [fmt.StepInfo(step=s, committed=c) for s, c in pairs]


def test_steps_to_delete_keeps_what_ray_lists_and_what_is_not_reported_yet():
    steps = _infos((0, True), (2, True), (4, True), (6, False), (8, True), (10, True), (12, False))
    # Ray lists 4 and 8: 10 is committed but not reported yet, 6 and 12 may be in flight.
    assert steps_to_delete(steps, {4, 8}, restoring=False) == [0, 2]
    assert steps_to_delete(steps, set(), restoring=False) == []
    # At restore nothing is in flight: whatever Ray does not list goes, newer steps included.
    assert steps_to_delete(steps, {4, 8}, restoring=True) == [0, 2, 6, 10, 12]
    assert steps_to_delete(steps, set(), restoring=True) == [0, 2, 4, 6, 8, 10, 12]


def test_pointer_document_round_trips_and_refuses_what_it_does_not_know(tmp_path):
    p = Pointer(url="s3://bucket/run", step=42, world_size=8, experiment="exp")
    assert Pointer.from_json(p.to_json()) == p
    with pytest.raises(ckpt.FormatError, match="newer"):
        Pointer.from_dict({**p.to_dict(), "version": 99})
    with pytest.raises(ckpt.FormatError, match="not a ckpt pointer"):
        Pointer.from_dict({"step": 1})
    with pytest.raises(ValueError, match="step"):
        Pointer(url="x", step=-1, world_size=1)

    class _Checkpoint:  # what read_pointer uses of ray.train.Checkpoint
        import pyarrow.fs

        filesystem = pyarrow.fs.LocalFileSystem()
        path = str(tmp_path)

    with pytest.raises(ckpt.FormatError, match=POINTER_FILE):
        read_pointer(_Checkpoint())
    (tmp_path / POINTER_FILE).write_bytes(p.to_json())
    assert read_pointer(_Checkpoint()) == p


def test_claim_root(tmp_path):
    storage = ckpt.open_storage(str(tmp_path / "run"))
    claim_root(storage, "a")
    claim_root(storage, "a")
    with pytest.raises(ckpt.CkptError, match="belongs to the Ray Train run 'a'"):
        claim_root(storage, "b")
    other = ckpt.open_storage(str(tmp_path / "other"))
    ckpt.save({"w": torch.ones(2)}, other, step=3)
    with pytest.raises(ckpt.CkptError, match="did not write"):
        claim_root(other, "a")


def test_importing_ckpt_never_imports_ray_and_a_missing_ray_names_the_extra():
    code = (
        "import sys, ckpt, ckpt.integrations; assert 'ray' not in sys.modules, 'ray imported'\n"
        "sys.modules['ray'] = None\n"
        "try:\n    import ckpt.integrations.ray_train\nexcept ImportError as e:\n    print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    assert "pip install 'ckpt[ray-train]'" in done.stdout
