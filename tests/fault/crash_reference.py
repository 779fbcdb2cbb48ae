"""The crash harness's reference training and its checks of a run directory (see
:mod:`tests.fault.crash_harness`): the model and steps a trainer runs, what an uninterrupted
training holds after each step, and what every committed step of a chain must restore to."""

from __future__ import annotations

import shutil
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

import ckpt
from ckpt.verify import verify_step

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
