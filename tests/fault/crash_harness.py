"""Crash consistency: SIGKILL the trainer, the node agent, or both, at random moments of saves.

A *chain* is one run directory that a sequence of trials keeps training into, as a job that
crashes and restarts would. Each trial starts a trainer process that restores the newest
committed checkpoint, trains a small model (Adam, plus a tensor rewritten in place every
step) and saves every step with :class:`ckpt.Checkpointer` (``keep_last=2``); then, after a
random delay, one of these happens:

- ``trainer``: the trainer (in-process sink) is killed;
- ``agent-trainer``: the trainer (``agent=``, a real ``ckpt-agent`` daemon) is killed; the
  agent, alive, persists and commits what it was handed;
- ``agent``: the agent is killed; the trainer is left running a little, then killed;
- ``both``: agent and trainer are killed, each at its own random moment.

After each trial, with nothing running any more (a surviving agent is waited for until it
holds nothing unfinished):

- the newest committed step never goes backwards (no committed checkpoint is lost);
- every committed step verifies (``ckpt.verify``) and restores bit-exactly to what an
  uninterrupted training computes for that step (so the resumed training was exact too);
- every incomplete step is invisible: ``ckpt.load`` of it fails, the default load gets the
  newest committed step;
- ``ckpt gc --min-age 0`` (on a copy: the next trial starts on the leftovers) leaves nothing
  but committed steps.

At the end of a chain, a new agent starts and must remove every shared-memory segment the
killed agents left; after it stops none may remain.

Trainers and agents are forked from a warm process (``multiprocessing`` forkserver with torch
preloaded), so a trial costs its kill delay plus the checks. Seeded; bounded by
``--max-seconds`` (no new trial starts after it).

    python -m tests.fault.crash_trials --trials 500 --jobs 3 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import ckpt
from ckpt.verify import verify_step

VARIANTS = ("trainer", "agent-trainer", "agent", "both")
SHM = "/dev/shm"
KEEP_LAST = 2
BIG = (128, 256)  # 128 KiB rewritten in place each step: copied eagerly at save


# ---------------------------------------------------------------------------------------------
# The training the trainer runs and the harness replays


# The harness's chains are threads of one process and build from torch's one global generator:
# two builds at once interleave its draws and give other initial weights (75 of 900 concurrent
# builds did). Where the Reference's rebuild was one of them, its every step was wrong and the
# committed steps compared with it "restored other values" though each verified.
_BUILD_LOCK = threading.Lock()


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    with _BUILD_LOCK:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 16))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 32, generator=g), torch.randn(8, 16, generator=g)
    loss = ((model(x) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def big_at(step: int) -> torch.Tensor:
    return torch.randn(*BIG, generator=torch.Generator().manual_seed(1_000_003 + step))


def make_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model, "optim": opt, "big": torch.zeros(*BIG), "meta": {"step": -1}}


def _flat(state: dict[str, Any]) -> list[torch.Tensor]:
    """Every tensor of the state, in a fixed order, for bitwise comparison."""
    out = [t.detach().clone() for t in state["model"].state_dict().values()]
    osd = state["optim"].state_dict()["state"]
    for k in sorted(osd):
        out += [v.detach().clone() if isinstance(v, torch.Tensor) else torch.tensor(v) for _n, v in sorted(osd[k].items())]
    return out + [state["big"].clone(), torch.tensor(state["meta"]["step"])]


class Reference:
    """What an uninterrupted training holds after each step (a window of recent steps)."""

    def __init__(self, window: int = 1500) -> None:
        self._lock = threading.Lock()
        self.window = window
        self._reset()

    def _reset(self) -> None:
        self.model, self.opt = build()
        self.state = make_state(self.model, self.opt)
        self.at = -1
        self.cache: dict[int, list[torch.Tensor]] = {}
        self.order: deque[int] = deque()

    def at_step(self, step: int) -> list[torch.Tensor]:
        with self._lock:
            if step in self.cache:
                return self.cache[step]
            if step < self.at:
                self._reset()
            while self.at < step:
                self.at += 1
                train_step(self.model, self.opt, self.at)
                self.state["big"].copy_(big_at(self.at))
                self.state["meta"]["step"] = self.at
                if self.at > step - self.window:
                    self.cache[self.at] = _flat(self.state)
                    self.order.append(self.at)
                    while len(self.order) > self.window:
                        self.cache.pop(self.order.popleft(), None)
            return self.cache[step]


# ---------------------------------------------------------------------------------------------
# Processes (forked from the forkserver)


def _redirect(log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def trainer_main(run: str, agent: str | None, log_path: str) -> None:
    _redirect(log_path)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)
    import tqdm

    tqdm.tqdm.set_lock(threading.RLock())  # not a multiprocessing lock: a SIGKILL would leak its semaphore
    model, opt = build()
    state = make_state(model, opt)
    ck = ckpt.Checkpointer(run, every_n_steps=1, keep_last=KEEP_LAST, agent=agent, commit_timeout_s=30,
                           max_chunk_bytes=64 << 10, io_threads=2)
    start = ck.restore(state) or 0
    print(f"restored {start}", flush=True)  # the harness waits for this line
    ck.attach(opt)
    step = start
    while True:
        train_step(model, opt, step)
        state["big"].copy_(big_at(step))
        state["meta"]["step"] = step
        ck.save(step, state)
        print(f"step {step}", flush=True)  # the harness counts these: is training going on?
        step += 1


def agent_main(argv: list[str], log_path: str) -> None:
    _redirect(log_path)
    from agent.cli import main

    sys.exit(main(argv))


_CTX: Any = None


def context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # torch._dynamo: the first optimizer built imports it (seconds), agent.*: the daemon and sink
        _CTX.set_forkserver_preload(["torch", "torch._dynamo", "ckpt", "agent.daemon", "agent.trainer", "agent.cli",
                                     "tests.fault.crash_harness", "tests.fault.load_harness"])
    return _CTX


class Agent:
    def __init__(self, home: Path, prefix: str, n: int) -> None:
        self.dir = home
        self.socket = str(home / "agent.sock")
        ready = home / f"ready{n}.json"
        self.proc = context().Process(target=agent_main, args=(
            ["serve", "--socket", self.socket, "--shm-prefix", prefix, "--memory-budget", "64MiB",
             "--ready-file", str(ready), "--log-format", "text", "--log-level", "WARNING", "--drain-timeout", "60"],
            str(home / "agent.log")), daemon=False)
        self.proc.start()
        deadline = time.monotonic() + 60
        while not ready.exists():
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start: {self.logs()}")
            time.sleep(0.01)

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    def logs(self) -> str:
        p = self.dir / "agent.log"
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()

    def stop(self) -> int:
        self.proc.terminate()  # SIGTERM: drain, then exit
        self.proc.join(90)
        if self.proc.is_alive():
            self.kill()
            raise RuntimeError(f"agent did not stop on SIGTERM: {self.logs()}")
        return self.proc.exitcode

    def settle(self, run_url: str, timeout: float = 60) -> None:
        """Wait until the agent holds nothing unfinished for ``run_url``."""
        from agent.pb import pb
        from agent.trainer.client import AgentClient

        done = {pb.SNAPSHOT_STATE_COMMITTED, pb.SNAPSHOT_STATE_FAILED}
        deadline = time.monotonic() + timeout
        with AgentClient(self.address) as c:
            while True:
                snaps = c.list_snapshots(run_url)
                if all(s.state in done for s in snaps) and c.status().persist_queue == 0:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"agent still busy after {timeout} s: {[(s.key.step, s.state) for s in snaps]}")
                time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# Checks


_STDOUT_LOCK = threading.Lock()


class TrialFailure(AssertionError):
    pass


def check_run(run: Path, scratch: Path, ref: Reference, previous_newest: int | None) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while run.exists() and any(p.name.startswith(".trash-") for p in run.iterdir()) \
            and time.monotonic() < deadline:
        time.sleep(0.02)  # a killed trainer's background deletion finishing
    if scratch.exists():
        shutil.rmtree(scratch)
    for attempt in range(50):
        try:
            if run.exists():
                shutil.copytree(run, scratch)
            else:
                scratch.mkdir()
            break
        except (shutil.Error, FileNotFoundError):  # the agent's retention removing a step meanwhile
            shutil.rmtree(scratch, ignore_errors=True)
            time.sleep(0.05)
    else:
        raise TrialFailure("could not copy the run: it kept changing")
    storage = ckpt.open_storage(str(scratch))
    steps = ckpt.list_steps(storage)  # an empty list if the run directory was never created
    committed = [s.step for s in steps if s.committed]
    incomplete = [s.step for s in steps if not s.committed]
    newest = committed[-1] if committed else None
    if previous_newest is not None and (newest is None or newest < previous_newest):
        raise TrialFailure(f"newest committed step went from {previous_newest} to {newest}: a checkpoint was lost")
    for s in committed:
        report = verify_step(storage, s)
        if not report.ok:
            raise TrialFailure(f"committed step {s} does not verify: {[p.message for p in report.problems][:5]}")
        model, opt = build()
        state = make_state(model, opt)
        ck = ckpt.Checkpointer(storage, keep_last=None)
        try:
            got = ck.restore(state, step=s)
        finally:
            ck.close()
        if got != s + 1:
            raise TrialFailure(f"restore of step {s} returned {got}")
        have, want = _flat(state), ref.at_step(s)
        if len(have) != len(want) or not all(torch.equal(a, b) for a, b in zip(have, want)):
            raise TrialFailure(f"committed step {s} restores other values than the training had at step {s}")
    if committed:
        model, opt = build()
        state = make_state(model, opt)
        ck = ckpt.Checkpointer(storage, keep_last=None)
        try:
            if ck.restore(state) != newest + 1:
                raise TrialFailure("restore without a step did not pick the newest committed step")
        finally:
            ck.close()
    for s in incomplete:
        try:
            ckpt.load({"meta": {}}, storage, step=s, strict=False)
        except ckpt.CheckpointNotFoundError:
            continue
        raise TrialFailure(f"incomplete step {s} is readable")
    tmp_in_committed = sum(1 for s in committed for f in storage.walk(ckpt.format.step_dir(s)) if f.endswith(".tmp"))
    from ckpt.cli import main as cli

    import contextlib
    import io

    with _STDOUT_LOCK, contextlib.redirect_stdout(io.StringIO()):  # one sys.stdout for all threads
        code = cli(["gc", str(scratch), "--keep-last", str(KEEP_LAST), "--min-age", "0"])
    if code != 0:
        raise TrialFailure(f"ckpt gc exited {code}")
    left = sorted(p.name for p in scratch.iterdir())
    kept = [ckpt.format.step_dir(s) for s in committed[-KEEP_LAST:]]
    if left != kept:
        raise TrialFailure(f"after gc the run holds {left}, expected only the committed steps {kept}")
    gc_storage = ckpt.open_storage(str(scratch))
    tmp_left = [f for s in committed[-KEEP_LAST:] for f in gc_storage.walk(ckpt.format.step_dir(s)) if f.endswith(".tmp")]
    if tmp_left:
        raise TrialFailure(f"after gc temporary files of killed writes are left in committed steps: {tmp_left[:3]}")
    shutil.rmtree(scratch)
    return {"committed": committed, "incomplete": incomplete, "tmp_in_committed": tmp_in_committed}


# ---------------------------------------------------------------------------------------------
# Chains of trials


def _steps_logged(log_path: str) -> int:
    with open(log_path, errors="replace") as f:
        return sum(1 for line in f if line.startswith("step "))


def _wait_restored(trainer: Any, log_path: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(log_path, errors="replace") as f:
                if "restored " in f.read():
                    return
        except FileNotFoundError:
            pass
        if not trainer.is_alive():
            raise TrialFailure(f"the trainer exited with {trainer.exitcode} before restoring")
        if time.monotonic() > deadline:
            raise TrialFailure(f"the trainer did not restore within {timeout} s")
        time.sleep(0.005)


@dataclass
class ChainResult:
    trials: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    segments_left: int = 0


def run_chain(chain: int, trials: int, seed: int, home: Path, ref: Reference, deadline: float,
              variants: tuple[str, ...] = VARIANTS, max_delay_s: float = 1.5) -> ChainResult:
    rng = random.Random(seed * 1_000_003 + chain)
    home.mkdir(parents=True, exist_ok=True)
    run = home / "run"
    prefix = f"ch{os.getpid() % 100000}x{chain}"
    result = ChainResult()
    agent: Agent | None = None
    agents_started = 0
    newest: int | None = None

    def new_agent() -> Agent:
        nonlocal agents_started
        agents_started += 1
        return Agent(home, prefix, agents_started)

    try:
        for t in range(trials):
            if time.monotonic() > deadline:
                break
            variant = rng.choice(variants)
            delay = rng.uniform(0.0, max_delay_s)
            uses_agent = variant != "trainer"
            if uses_agent and (agent is None or not agent.alive()):
                try:
                    agent = new_agent()
                except Exception as e:  # noqa: BLE001
                    result.failures.append(f"chain {chain} trial {t}: {e}")
                    break
            log_path = str(home / f"trainer{t}.log")
            trainer = context().Process(target=trainer_main, args=(str(run), agent.address if uses_agent else None,
                                                                   log_path))
            rec: dict[str, Any] = {"chain": chain, "trial": t, "variant": variant, "delay_s": round(delay, 3)}
            trainer.start()
            t0 = time.monotonic()
            try:
                # The delay counts from the end of the restore: kills land among the saves.
                _wait_restored(trainer, log_path)
                rec["restore_s"] = round(time.monotonic() - t0, 3)
                t0 = time.monotonic()
                if variant in ("trainer", "agent-trainer"):
                    time.sleep(delay)
                    rec["trainer_alive_at_kill"] = trainer.is_alive()
                    trainer.kill()
                    trainer.join()
                elif variant == "agent":
                    time.sleep(delay)
                    agent.kill()
                    steps_at_loss = _steps_logged(log_path)
                    time.sleep(rng.uniform(0.3, 0.6))
                    # training goes on: the trainer lives and keeps taking steps (saves fail)
                    rec["trainer_alive_after_agent_loss"] = trainer.is_alive() and \
                        _steps_logged(log_path) >= steps_at_loss + 2
                    trainer.kill()
                    trainer.join()
                else:  # both, in a random order at random moments
                    other = rng.uniform(0.0, max_delay_s)
                    first, second = sorted([("trainer", delay), ("agent", other)], key=lambda x: x[1])
                    time.sleep(first[1])
                    (trainer.kill if first[0] == "trainer" else agent.kill)()
                    time.sleep(second[1] - first[1])
                    (trainer.kill if second[0] == "trainer" else agent.kill)()
                    trainer.join()
                rec["ran_s"] = round(time.monotonic() - t0, 3)
                if agent is not None and agent.alive():
                    agent.settle(ckpt.open_storage(str(run)).url)
                t1 = time.monotonic()
                out = check_run(run, home / "scratch", ref, newest)
                rec["check_s"] = round(time.monotonic() - t1, 3)
                rec.update(committed=len(out["committed"]), incomplete=len(out["incomplete"]),
                           newest=out["committed"][-1] if out["committed"] else None,
                           tmp_in_committed=out["tmp_in_committed"])
                newest = rec["newest"] if rec["newest"] is not None else newest
                os.unlink(log_path)
            except Exception as e:  # noqa: BLE001 - recorded; the chain stops here
                logs = Path(log_path).read_text(errors="replace")[-2000:] if os.path.exists(log_path) else ""
                result.failures.append(f"chain {chain} trial {t} ({variant}, delay {delay:.3f}s): "
                                       f"{type(e).__name__}: {e}\n--- trainer log ---\n{logs}"
                                       + (f"\n--- agent log ---\n{agent.logs()}" if agent else ""))
                rec["failed"] = True
                result.trials.append(rec)
                break
            finally:
                if trainer.is_alive():
                    trainer.kill()
                    trainer.join()
            result.trials.append(rec)
    finally:
        if agent is not None and agent.alive():
            agent.kill()
        # The node's next agent removes what killed agents left; nothing remains after it stops.
        try:
            final = new_agent()
            final.stop()
        except Exception as e:  # noqa: BLE001
            result.failures.append(f"chain {chain}: final agent: {e}")
        left = [n for n in os.listdir(SHM) if n.startswith(prefix + ".")]
        result.segments_left = len(left)
        for n in left:
            os.unlink(os.path.join(SHM, n))
        if left:
            result.failures.append(f"chain {chain}: shared-memory segments left behind: {left}")
    return result


def run_trials(trials: int, *, jobs: int, seed: int, max_seconds: float, variants: tuple[str, ...] = VARIANTS,
               max_delay_s: float = 1.5, workdir: str | None = None) -> dict[str, Any]:
    """Run ``trials`` trials over ``jobs`` chains in parallel; returns the figures."""
    torch.set_num_threads(1)
    context()
    # One Reference per chain: a chain checks steps near its own head, and chains drift
    # thousands of steps apart; one shared Reference replayed from step 0 each time the chains'
    # turns crossed its window (249 replays in one 500-trial run, 763 s against 263 s).
    refs = [Reference(window=500) for _ in range(jobs)]
    deadline = time.monotonic() + max_seconds
    t0 = time.monotonic()
    per = [trials // jobs + (1 if i < trials % jobs else 0) for i in range(jobs)]
    results: list[ChainResult | None] = [None] * jobs
    with tempfile.TemporaryDirectory(prefix="ck", dir=workdir) as tmp:
        def go(i: int) -> None:
            results[i] = run_chain(i, per[i], seed, Path(tmp) / f"c{i}", refs[i], deadline, variants, max_delay_s)

        threads = [threading.Thread(target=go, args=(i,)) for i in range(jobs)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    recs = [r for res in results if res for r in res.trials]
    failures = [f for res in results if res for f in res.failures]
    by_variant = Counter(r["variant"] for r in recs)
    return {
        "trials": len(recs),
        "by_variant": dict(sorted(by_variant.items())),
        "failed_trials": sum(1 for r in recs if r.get("failed")),
        "kills_with_incomplete_step_left": sum(1 for r in recs if r.get("incomplete")),
        "committed_steps_checked": sum(r.get("committed", 0) for r in recs),
        "newest_committed_steps": [r.get("newest") for r in recs if r["trial"] == max(
            x["trial"] for x in recs if x["chain"] == r["chain"])],
        "training_went_on_after_agent_loss": sum(1 for r in recs if r.get("trainer_alive_after_agent_loss")),
        "agent_loss_trials": sum(1 for r in recs if "trainer_alive_after_agent_loss" in r),
        "tmp_files_in_committed_steps": sum(r.get("tmp_in_committed", 0) for r in recs),
        "segments_left": sum(res.segments_left for res in results if res),
        "lost_committed": 0 if not failures else None,
        "seconds": round(time.monotonic() - t0, 1),
        "failures": failures,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--jobs", type=int, default=3, help="chains run in parallel")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=1800, help="start no trial after this")
    ap.add_argument("--max-delay", type=float, default=1.5, help="kill delays are uniform in [0, this] seconds")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    figures = run_trials(args.trials, jobs=args.jobs, seed=args.seed, max_seconds=args.max_seconds,
                         variants=tuple(args.variants.split(",")), max_delay_s=args.max_delay)
    failures = figures.pop("failures")
    print(json.dumps(figures))
    for f in failures:
        print(f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":  # run it as `python -m tests.fault.crash_trials` (see that module)
    raise SystemExit(main())
