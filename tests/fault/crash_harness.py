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
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import ckpt

VARIANTS = ("trainer", "agent-trainer", "agent", "both")
SHM = "/dev/shm"
from .crash_reference import KEEP_LAST, Reference, TrialFailure, big_at, build, check_run, make_state, train_step

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
