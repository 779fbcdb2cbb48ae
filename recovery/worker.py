"""The worker side: the context ``train_fn`` gets, the Checkpointer wired to the coordinator
and the node agent, and the worker actor that sets up torch.distributed and runs ``train_fn``."""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import ckpt
from ckpt.commit import save_id as ckpt_save_id
from ckpt.restore import RestoreSource

from .config import CheckpointConfig
from .live import HealSpec, LiveSlot, adopt, clear_gradients, share_live_state

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerSpec:
    """Everything a worker needs to join its attempt, built by the launcher per rank."""

    backend: str  # the torch.distributed backend: "gloo" or "nccl"
    master_addr: str
    master_port: int
    collective_timeout_s: float
    coordinator: Any  # the coordinator actor's handle; None: no coordinator (nothing is reported)
    coordinator_name: str | None
    heartbeat_interval_s: float
    storage: str
    restore_step: int | None  # the step the launcher chose to resume from (None: from scratch)
    checkpoint: CheckpointConfig
    num_threads: int
    node: str | None = None
    agent: str | None = None  # the node agent's address; None: persist in-process
    relay: Any = None  # the node agent's actor: it batches this node's calls to the coordinator
    heal: HealSpec | None = None  # policy heal: continue from a survivor's live state, not a checkpoint
    holders: Any = None  # a ray.put of RestorePoint.holders (who holds which writer's snapshot), or None
    # A warm standby that took over a rank: the GPU ids Ray gave the lost process (its
    # CUDA_VISIBLE_DEVICES from now on; the standby holds no GPU of Ray's). None: as Ray set it.
    devices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"WorkerSpec.backend must be 'gloo' or 'nccl', got {self.backend!r}")
        if not isinstance(self.master_port, int) or not 0 < self.master_port < 65536:
            raise ValueError(f"WorkerSpec.master_port must be a TCP port, got {self.master_port!r}")
        if not isinstance(self.num_threads, int) or self.num_threads < 1:
            raise ValueError(f"WorkerSpec.num_threads must be an integer >= 1, got {self.num_threads!r}")


class Reporter:
    """Fire-and-forget calls to the coordinator: a coordinator that is down loses them, and
    training never waits for it.

    Heartbeats go from a background thread every ``interval_s`` with the latest step and
    metrics, whether or not training progressed: a coordinator that restarted relearns the
    attempt, the world and the run id from them at once, and a hang shows as heartbeats
    whose step stops increasing.

    Each heartbeat also carries this rank's step timing as running totals, ``(sections,
    seconds, measured)``: compute sections done and their seconds (``ctx.timed()`` blocks,
    ``ctx.compute_time(s)`` calls; ``measured`` True), or, while the rank measures none, its
    reported steps and the time between its reports. Totals, not samples: a node agent that
    relays only a rank's latest heartbeat, or a coordinator that restarted, loses nothing but
    resolution. The coordinator finds stragglers from them, and a hang's culprit: a rank that
    waits in a collective has finished a compute section the rank it waits for has not."""

    MAX_PENDING_EVENTS = 256  # CUDA timings not finished yet; older ones are dropped beyond this

    def __init__(self, coordinator: Any, attempt: int, rank: int, world_size: int, node: str | None,
                 interval_s: float, relay: Any = None) -> None:
        self.coordinator = coordinator
        self.relay = relay
        self.attempt = attempt
        self.rank = rank
        self.world_size = world_size
        self.node = node
        self.interval_s = interval_s
        self.run_id: str | None = None
        self._step: int | None = None
        self._metrics: dict[str, float] = {}
        self._sections = 0
        self._seconds = 0.0
        self._measured = False  # compute time is measured (else: time between reports)
        self._last_report: float | None = None  # perf_counter of the last report with a step
        self._depth = 0  # nested ctx.timed() blocks: only the outermost counts
        self._pending: collections.deque[tuple[Any, Any]] = collections.deque()  # CUDA (start, end) events
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False  # nothing is sent any more (an attempt stopped in place says nothing after)
        self._thread = threading.Thread(target=self._beat, name="recovery-heartbeat", daemon=True)
        if coordinator is not None:
            self._thread.start()

    def _send(self, method: str, *args: Any) -> None:
        if self.coordinator is None or self._closed:
            return
        try:
            if self.relay is not None:  # through this node's agent, batched with the node's other ranks
                self.relay.relay.remote(method, args)
            else:
                getattr(self.coordinator, method).remote(*args)
        except Exception:
            log.debug("coordinator call %s failed", method, exc_info=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            step, metrics = self._step, dict(self._metrics)
            timing = (self._sections, self._seconds, self._measured) if self._sections else None
        self._send("heartbeat", self.attempt, self.rank, self.world_size, step, metrics, self.node, self.run_id,
                   timing)

    def heartbeat(self, step: int | None, metrics: dict[str, float], *, force: bool = False) -> None:
        self._resolve()
        now = time.perf_counter()
        with self._lock:
            if step is not None:
                force = force or self._step is None  # the attempt's first step: the coordinator learns of it at once
                self._step = step
                if not self._measured and self._last_report is not None:
                    self._sections += 1
                    self._seconds += now - self._last_report
                self._last_report = now
            self._metrics.update(metrics)
        if force:
            self.flush()

    # -- compute time --------------------------------------------------------------------------------

    @property
    def timing(self) -> tuple[int, float, bool]:
        """``(sections, seconds, measured)``: what the next heartbeat carries."""
        self._resolve()
        with self._lock:
            return self._sections, self._seconds, self._measured

    def compute_time(self, seconds: float) -> None:
        """One compute section of ``seconds`` (measured by the caller)."""
        seconds = float(seconds)
        if not seconds >= 0 or seconds == float("inf"):
            raise ValueError(f"compute_time takes a finite number of seconds >= 0, got {seconds!r}")
        with self._lock:
            if not self._measured:  # from now on compute time, not the time between reports
                self._measured, self._sections, self._seconds = True, 0, 0.0
            self._sections += 1
            self._seconds += seconds

    @contextlib.contextmanager
    def timed(self, device: torch.device | None = None) -> Iterator[None]:
        """Time the block as compute (nested blocks count once). On a CUDA device the time is the
        GPU's, between two events on the current stream, read once the GPU passed them (never
        waited for); elsewhere the wall time of the block."""
        self._depth += 1
        if self._depth > 1:
            try:
                yield
            finally:
                self._depth -= 1
            return
        cuda = device is not None and device.type == "cuda"
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._pending.append((start, end))
                while len(self._pending) > self.MAX_PENDING_EVENTS:
                    self._pending.popleft()
                self._resolve()
            else:
                self.compute_time(time.perf_counter() - t0)

    def _resolve(self) -> None:
        # CUDA timings whose end event the GPU passed, in order (the training thread only)
        while self._pending and self._pending[0][1].query():
            start, end = self._pending.popleft()
            self.compute_time(start.elapsed_time(end) / 1000.0)

    # -- checkpoints ---------------------------------------------------------------------------------

    def saving(self, step: int, save_id: str, writers: Sequence[str]) -> None:
        self._send("saving", self.attempt, step, save_id, list(writers))

    def fragment_ready(self, step: int, save_id: str, writer: str) -> None:
        self._send("fragment_ready", self.attempt, step, save_id, writer)

    def snapshot(self, step: int, save_id: str, stall_s: float, nbytes: int, error: str | None) -> None:
        self._send("snapshot_report", self.attempt, self.rank, step, save_id, stall_s, nbytes, error)

    def restored(self, info: dict[str, Any]) -> None:
        self._send("restored", self.attempt, self.rank, info)

    def close(self) -> None:
        if self._closed:
            return
        self._stop.set()
        self.flush()
        self._closed = True


class RecoveryCheckpointer(ckpt.Checkpointer):
    """A ``ckpt.Checkpointer`` (``commit_by="external"``) that tells the coordinator about its
    saves, and measures which tier served each restore. ``restore_step``: the step the launcher
    chose to resume from, what ``restore`` without a step loads (no rank then waits for rank 0
    to list the steps and broadcast the newest). ``holders``: who holds which writer's snapshot
    of that step (a ``ray.put`` of :attr:`RestorePoint.holders`): the node agent asks only those
    agents for what it does not hold, not the whole ring."""

    def __init__(self, url: Any, *, reporter: Reporter, restore_step: int | None = None, holders: Any = None,
                 **options: Any) -> None:
        super().__init__(url, commit_by="external", **options)
        self.reporter = reporter
        self.restore_step = restore_step
        self.holders = holders
        reporter.run_id = self.run_id

    def _restore_source(self, step: int | None = None) -> RestoreSource:
        holders = self.holders
        if holders is None or self.restore_step is None:
            return super()._restore_source(step)
        if not isinstance(holders, Mapping):
            import ray

            holders = ray.get(holders)  # one copy per node in Ray's object store, whatever the ranks
        self.last_restore_source = source = self.sink.restore_source(self.storage, holders=holders, step=step)
        return source

    def save(self, step: int, state: dict[str, Any], *, force: bool = False) -> ckpt.SnapshotHandle | None:
        handle = super().save(step, state, force=force)
        if handle is None or handle.skipped:
            return handle
        save_id = ckpt_save_id(self.run_id, step)
        if self.group.rank == 0:
            self.reporter.saving(step, save_id, self.writers)

        def persisted(fut: Any) -> None:  # the coordinator reads this writer's fragment now, once
            if fut.exception() is None:
                self.reporter.fragment_ready(step, save_id, self.writer)

        handle.persisted.add_done_callback(persisted)

        def done(fut: Any) -> None:
            err = fut.exception()
            self.reporter.snapshot(step, save_id, handle.stall_s + handle.hook_stall_s, handle.nbytes,
                                   None if err is None else f"{type(err).__name__}: {err}")

        handle.committed.add_done_callback(done)
        return handle

    def wait_staged(self, timeout_s: float) -> None:
        """Wait (up to ``timeout_s``) until every snapshot taken is staged: its host copy done,
        so that training may change the tensors it references (an abandoned checkpointer whose
        state lives on, policy heal, no longer holds ``optimizer.step()`` back)."""
        import concurrent.futures

        with self._lock:
            pending = [h.staged for h in self._handles if not h.skipped]
        concurrent.futures.wait(pending, timeout=timeout_s)

    def restore(self, state: dict[str, Any], *, step: int | None = None, strict: bool = True) -> int | None:
        """``ckpt.Checkpointer.restore``, and its report (``last_restore``: step, seconds, bytes
        per tier, fallbacks) to the coordinator."""
        resumed = super().restore(state, step=self.restore_step if step is None else step, strict=strict)
        if self.last_restore is not None:
            self.reporter.restored(self.last_restore.to_dict())
        return resumed


@dataclass
class TrainContext:
    """What ``train_fn(ctx)`` gets."""

    rank: int
    world_size: int
    attempt: int  # 0 for the first start, +1 per restart
    restore_step: int | None  # the step recovery chose to resume from (``None``: from scratch)
    checkpointer: RecoveryCheckpointer
    device: torch.device
    node: str | None = None
    coordinator_name: str | None = None
    heal: HealSpec | None = None  # this attempt continues from live state (policy heal)
    _reporter: Reporter | None = field(default=None, repr=False)
    _live: LiveSlot | None = field(default=None, repr=False)

    @property
    def heal_step(self) -> int | None:
        """The step this attempt continues after without rollback (policy heal), else None."""
        return None if self.heal is None else self.heal.step

    @property
    def live_state(self) -> dict[str, Any] | None:
        """When this attempt heals: the state this process registered with :meth:`resume` in
        the attempt before, kept alive (model, optimizer, ... as they were), so that ``train_fn``
        can reuse the objects (``state = ctx.live_state or build()``) instead of building and
        copying them. None otherwise (a new process, a reload, a first start)."""
        return self._live.state if self.heal is not None and self._live is not None else None

    def resume(self, state: dict[str, Any]) -> int:
        """Bring ``state`` to where the job continues and return the first step to train; call it
        once, before the loop, with the whole training state (what you checkpoint, plus anything
        that must survive a heal). Reload and first start: restore the newest committed
        checkpoint into it (``checkpointer.restore``; 0 when there is none). Heal: every rank
        gets the live state of the survivor the policy chose (its own, kept by this process, or
        copied over the new process group) at :attr:`heal_step`, and continues at the next step.
        ``state`` is then this process's live state: call :meth:`report` once per step, after
        the optimizer step."""
        if self.heal is None:  # the checkpointer loads the step the launcher chose
            start = self.checkpointer.restore(state) or 0
        else:
            kept = self._live.state if self._live is not None else None
            if self.rank not in self.heal.receivers:
                if kept is None:
                    raise RuntimeError(f"policy heal: rank {self.rank} was to continue from its own live state, "
                                       "but this process holds none")
                adopt(kept, state)  # its own live state, at the step healed at (or the source's)
            elif self._live is not None:
                self._live.receiving = True
            nbytes, seconds = share_live_state(state, self.heal, rank=self.rank, world_size=self.world_size,
                                               device=self.device)
            clear_gradients(state)  # of the step in flight: it is trained again from the live state
            start = self.heal.step + 1
            if self._reporter is not None:
                self._reporter.restored({"step": self.heal.step, "seconds": seconds, "bytes": {"live": nbytes},
                                         "fallbacks": [], "source": self.heal.source})
        if self._live is not None:
            self._live.register(state, start - 1)
        return start

    def report(self, step: int, **metrics: float) -> None:
        """Heartbeat with progress: call it every step (the latest is sent every
        ``heartbeat_interval_s``). A rank whose step stops increasing for ``hang_timeout_s`` is
        declared hung. Metrics (loss, grad_norm, ...) are shown by the coordinator. With a state
        registered by :meth:`resume`, it also says that ``step`` is applied to it (policy heal
        continues from there), and it is where a stop asked by recovery is taken."""
        if self._reporter is not None:
            self._reporter.heartbeat(int(step), {k: float(v) for k, v in metrics.items()})
        if self._live is not None:
            self._live.reported(int(step))

    def timed(self) -> contextlib.AbstractContextManager[None]:
        """``with ctx.timed(): ...`` around this rank's compute that waits for no other rank (the
        forward and backward of a model whose gradients are averaged after; with DDP, whose
        backward waits for the gradient all-reduce, the forward): the coordinator compares the
        ranks' compute times to find stragglers and a hang's culprit (docs/recovery.md)."""
        return self._reporter.timed(self.device) if self._reporter is not None else contextlib.nullcontext()

    def compute_time(self, seconds: float) -> None:
        """Report ``seconds`` of compute measured by the caller, as one ``timed()`` block would."""
        if self._reporter is not None:
            self._reporter.compute_time(seconds)
