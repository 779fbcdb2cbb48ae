"""The training-loop hook API: lazy asynchronous checkpoints that cost almost nothing.

```python
ckptr = ckpt.Checkpointer(url, every_n_steps=100, keep_last=3)
start = ckptr.restore(state)          # newest committed checkpoint, resharded; step to resume from
ckptr.attach(optimizer)               # pre-step hook: waits for staging of this optimizer's tensors
for step in range(start or 0, total):
    ...forward, backward...
    optimizer.step()
    ckptr.save(step, state)           # returns at once; snapshots only on checkpoint steps
ckptr.wait(); ckptr.close()
```

A checkpoint goes through four observable states: captured (``save`` took references to every
tensor and copied the small state) → staged (host copy complete; training may change the tensors
again) → persisted (this process's chunks and fragment are durable) → committed (readers see it).

What is copied when: tensors that only an attached optimizer changes (its parameters and its
state) are copied lazily in the background, overlapping the next forward and backward pass;
everything else (buffers such as BatchNorm running statistics, RNG states, any tensor
training may change outside ``optimizer.step()``) and all non-tensor state are copied
during ``save``. Without an attached optimizer every tensor is copied during ``save``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Any

import torch

from . import format as fmt
from .capture import CapturePlan, Preparation, lazy_owners, leaf_key, local_tensor, prefault, storage_ptr
from .commit import save_id
from .config import CheckpointerConfig
from .consolidate import Consolidator
from .dist import Group
from .errors import CkptError
from .gcpause import gc_paused, without_gc
from .handles import CheckpointerStatus, HandleLog, SnapshotHandle, chain, status_of
from .hostpool import HostBufferPool, take_slab
from .manifest import Manifest
from .plan import SavePlan, TensorItem
from .replicated import load_step as shared_load
from .restore import RestoreReport, RestoreSource, restore_report
from .retention import RetentionPolicy, run_gc
from .signals import CommitSignals
from .sink import InProcessSink, PersistJob, Sink, SinkConfig, open_sink
from .staging import StageJob, Stager, step_pre_hook
from .state import container_kinds, encode_value, flatten
from .stateful import CachedExpander, Expanded, expand
from .storage import open_storage
from .telemetry import Telemetry
from .version import library_versions
from .waits import skipped

log = logging.getLogger(__name__)


class Checkpointer:
    """Lazy asynchronous checkpoints of a training loop; see the module docstring."""

    def __init__(self, url: Any, *, sink: Sink | None = None, **options: Any) -> None:
        self.config = cfg = CheckpointerConfig(url=url, **options)
        self.storage = open_storage(cfg.url, storage_options=cfg.storage_options, retry=cfg.retry)
        self.group = Group.resolve(cfg.process_group)
        # The one collective of its life: a run id every rank agrees on (save ids then need no talk).
        self.run_id: str = self.group.broadcast(uuid.uuid4().hex[:12])
        self.writer = fmt.writer_name(self.group.global_rank)
        self.writers = tuple(fmt.writer_name(r) for r in self.group.global_ranks)
        sink_config = SinkConfig(io_threads=cfg.io_threads, durable=cfg.durable, commit_timeout_s=cfg.commit_timeout_s,
                                 library_versions=library_versions(), layout=cfg.layout)
        self.consolidator = (Consolidator(self.storage, threads=cfg.io_threads, durable=cfg.durable)  # kept steps->zarr
                             if cfg.consolidate == "kept" and cfg.layout == "packs" and self.group.rank == 0 else None)
        ours = cfg.commit_by == "rank0"  # a rank of this group commits (not an external coordinator)
        keep = RetentionPolicy(keep_last=cfg.keep_last, keep_every=cfg.keep_every) if cfg.keep_last and ours else None
        after_commit = self._retention if keep is not None else None
        signals = CommitSignals.of(self.group, self.run_id, self.writer) if ours and sink is None else None
        if sink is None and cfg.agent is not None:  # the agent commits, runs retention: the trainer may be gone
            sink = open_sink("agent", cfg.agent, storage=self.storage, config=sink_config, writer=self.writer,
                             after_commit=after_commit, retention=keep, signals=signals)
        self.sink = sink or InProcessSink(self.storage, sink_config, after_commit=after_commit, signals=signals)
        self._signals = signals
        self.stager = Stager()
        self.telemetry = Telemetry(cfg.metrics)
        self.pool: HostBufferPool | None = None
        self._optimizers: list[torch.optim.Optimizer] = []
        self._hooks: list[Any] = []
        self._latest_stage: StageJob | None = None
        self._latest_handle: SnapshotHandle | None = None
        self._expander = CachedExpander()
        self._plan: CapturePlan | None = None
        self._handles = HandleLog()  # unfinished, and the last finished
        self._errors: list[str] = []
        self._reported = 0
        self._lock = threading.Lock()
        self._hook_stall_s = 0.0
        self._skipped = 0
        self._closed = False
        self._warned_no_optimizer = False
        self._capture_lock = threading.Lock()
        self._preparing: Preparation | None = None
        self._interrupt = threading.Event()  # interrupt(): a save waiting for host memory gives up
        self.last_restore: RestoreReport | None = None

    # -- the four verbs ---------------------------------------------------------------------

    @without_gc  # the documents and plans of thousands of arrays
    def restore(self, state: dict[str, Any], *, step: int | None = None, strict: bool = True) -> int | None:
        """Load the newest committed checkpoint (or ``step``) into ``state``, resharded to its
        current layout. Returns the step to resume from (the saved step + 1), or ``None`` when
        the run has no committed checkpoint (and then changes nothing). ``strict=False``
        skips entries found on one side only (a model restored without its optimizer, say);
        shape and dtype mismatches are errors always. ``last_restore`` then says what each tier
        served and which fell back, and why."""
        t0 = time.perf_counter()
        storage, chosen = self._restore_source(step), step
        if step is None:
            steps = fmt.committed_steps(storage) if self.group.rank == 0 else None
            chosen = self.group.broadcast(steps[-1] if steps else None)
        if chosen is None:
            log.info("no committed checkpoint in %s: starting from scratch", self.storage.url)
            self.last_restore = restore_report(storage, None, time.perf_counter() - t0)
            return None
        expanded = expand(state)  # after the check: building optimizer state has side effects
        shared_load(storage, expanded.tree, int(chosen), group=self.group, writer=self.writer, strict=strict, allow_pickle=
                    self.config.allow_pickle, threads=storage.read_threads(chosen, self.config.io_threads), mode=self.config.replicated_reads)
        expanded.apply()
        self.last_restore = report = restore_report(storage, int(chosen), time.perf_counter() - t0)
        self.telemetry.restored(report)
        log.info("restored step %d from %s in %.2f s", chosen, self.storage.url, report.seconds)
        self.prepare(state, deferred=(int(chosen) + 1) % self.config.every_n_steps != 0)  # the next step's save: go
        return int(chosen) + 1

    def _restore_source(self, step: int | None = None) -> RestoreSource:
        """Where ``restore`` of ``step`` (None: the newest) reads from: the sink's tiers (a node
        agent's memory, peers), storage."""
        self.last_restore_source = source = self.sink.restore_source(self.storage, step=step)
        return source

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer.step()`` wait until this optimizer's tensors of the latest snapshot
        are staged, and let them be copied lazily."""
        if any(o is optimizer for o in self._optimizers):
            return
        index = len(self._optimizers)
        self._optimizers.append(optimizer)
        self._hooks.append(optimizer.register_step_pre_hook(step_pre_hook(lambda: self._before_step(index))))

    def save(self, step: int, state: dict[str, Any], *, force: bool = False) -> SnapshotHandle | None:
        """Snapshot ``state`` as checkpoint ``step`` if it is a checkpoint step (every
        ``every_n_steps``, or ``force``); returns at once with a handle, or ``None``."""
        self._check_open()
        self._report_errors()
        checkpoint = force or step % self.config.every_n_steps == 0
        self._preparing is not None and self._preparing.called(checkpoint)  # a restore's preparation: see prepare
        if not checkpoint:
            return None
        t0 = time.perf_counter()
        handle = SnapshotHandle(step)
        try:
            self._capture(step, state, handle)
        except BaseException as e:
            self._fail(handle, e)
            raise
        finally:
            handle.stall_s = time.perf_counter() - t0
            with self._lock:
                self._handles.append(handle)
            self.telemetry.saved(handle)
        return handle

    def interrupt(self) -> None:
        """From another thread: a ``save`` waiting for host memory (or else the next one that
        would wait) gives up now; that checkpoint is skipped (its handle says ``skipped``)."""
        self._interrupt.set()
        if (pool := self.pool) is not None:
            pool.wake()

    def wait(self, timeout: float | None = None) -> None:
        """Block until every checkpoint taken so far is committed or failed; then report failures."""
        wait_futures(self._commits(), timeout=timeout)
        self._report_errors()

    def close(self, *, wait: bool = True) -> None:
        """Finish outstanding checkpoints (unless ``wait=False``), stop the threads, free memory."""
        if self._closed:
            return
        try:
            if wait:
                wait_futures(self._commits())
        finally:
            self._closed = True
            for h in self._hooks:
                h.remove()
            self.stager.close()
            self.sink.close(wait=wait)
            if self.consolidator is not None and wait:
                self.consolidator.close(last=self._handles.last_committed(), keep_every=self.config.keep_every)
            self._plan = None  # it holds views of the slabs
            clear = lambda: self.pool is not None and self.pool.clear()  # (a preparation may make the pool later)
            # A preparation is not waited for: one still making a slab frees them as it ends
            self._preparing.stop(clear) if self._preparing is not None else clear()
        self._report_errors()

    def _commits(self) -> list[Future]:
        with self._lock:
            return [h.committed for h in self._handles if not h.skipped]

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(wait=exc[0] is None)

    def status(self) -> CheckpointerStatus:
        with self._lock:
            handles, errors = self._handles.snapshot(), tuple(self._errors)
        return status_of(handles, errors, self.pool, budget=self.config.host_budget_bytes, skipped=self._skipped,
                         hook_stall_s=self._hook_stall_s)

    # -- internals --------------------------------------------------------------------------

    def prepare(self, state: dict[str, Any], *, deferred: bool = False) -> Future:
        """Build the first checkpoint's plan and host memory (pages faulted in) off the training
        thread, so that it stalls the loop no more than later ones; ``restore`` calls it (call it
        before the loop from scratch), ``deferred`` to the loop's next call (see ``Preparation``).
        ``state_dict`` calls stay on the caller's thread: beside training they race."""
        expanded = self._expander.expand(state)

        def work(stop: Callable[[], bool], planned: Callable[[], None]) -> None:
            with self._capture_lock:  # close() stops it between slabs: nothing would use them
                with gc_paused():  # the plan's many small objects; not the slabs (training goes on)
                    plan, _tensors, _values = self._plan_for(expanded)
                planned()
                prefault(self._pool_for(plan.nbytes, plan.mine), plan, stop=stop)

        if self._preparing is not None:  # a second restore: the older one makes no more slabs
            self._preparing.halt()
        self._preparing = Preparation(work, deferred=deferred)
        return self._preparing.future

    def _plan_for(self, expanded: Expanded) -> tuple[CapturePlan, list[Any], dict[str, Any]]:
        cfg = self.config
        leaves = list(flatten(expanded.tree))
        key = tuple(leaf_key(path, leaf) if is_tensor else path for path, leaf, is_tensor in leaves)
        values = {path: encode_value(leaf, allow_pickle=cfg.allow_pickle, where=path)
                  for path, leaf, is_tensor in leaves if not is_tensor}
        tensors = [leaf for _, leaf, is_tensor in leaves if is_tensor]
        # Same tensors (memory, shape, layout) as the previous save: reuse its plan and, per
        # slab, its host views and write requests; only the values and the sources are new.
        plan = self._plan
        if plan is None or plan.key != key:
            plan = self._plan = CapturePlan.build(key, leaves, values, rank=self.group.rank, world=self.group.world,
                                                  max_chunk_bytes=cfg.max_chunk_bytes,
                                                  containers=container_kinds(expanded.tree))
        return plan, tensors, values

    def _capture(self, step: int, state: dict[str, Any], handle: SnapshotHandle) -> None:
        cfg = self.config
        expanded = self._expander.expand(state)
        with self._capture_lock:  # a prepare() in flight finishes first
            plan, tensors, values = self._plan_for(expanded)
        nbytes = plan.nbytes
        handle.nbytes = nbytes
        pool = self._pool_for(nbytes, plan.mine)
        try:
            slab = take_slab(pool, nbytes, step=step, when_busy=cfg.when_busy, timeout=cfg.buffer_wait_timeout_s,
                             cancel=self._interrupt)
        except (CkptError, OSError) as e:
            # Host memory comes from the sink (a node agent's shared memory): when the sink is
            # gone, this checkpoint fails like any other persist failure; training goes on.
            if cfg.on_error == "raise":
                raise
            self._fail(handle, e)
            self._record_error(step, handle.committed)
            return
        if slab is None:
            handle.skipped = True
            self._skipped += 1
            threading.Thread(target=skipped, name="ckpt-skipped", daemon=True, args=(  # the others stop waiting
                self.storage, step, save_id(self.run_id, step), self.writer, self.writers), kwargs={
                "committer": self.group.rank == 0 and cfg.commit_by == "rank0", "signals": self._signals}).start()
            return
        views, host_requests = plan.host_views(slab)

        owners = lazy_owners(self._optimizers)
        if not self._optimizers and not self._warned_no_optimizer:
            self._warned_no_optimizer = True
            log.info("no optimizer attached: every tensor is copied during save(); "
                     "ckptr.attach(optimizer) lets parameters and optimizer state be copied lazily")
        groups: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self._optimizers]
        ready = None
        for i, dst in zip(plan.mine_idx, views):
            src = local_tensor(tensors[i]).detach()
            owner = owners.get(storage_ptr(src))
            if owner is None:
                dst.copy_(src)  # eager: training may change it before the next optimizer step
            else:
                groups[owner].append((src, dst))
                if src.device.type == "cuda" and ready is None:
                    ready = torch.cuda.current_stream(src.device).record_event()
        host_plan = SavePlan(plan.plan.arrays, host_requests, plan.plan.metadata, values, plan.plan.containers)
        job = PersistJob(step=step, save_id=save_id(self.run_id, step), writer=self.writer, writers=self.writers,
                         plan=host_plan, committer=self.group.rank == 0 and cfg.commit_by == "rank0", release=lambda: pool.release(slab), slab=slab)
        job.persisted.add_done_callback(lambda f: chain(f, handle.persisted, step))  # the fragment stays with the job
        job.committed.add_done_callback(lambda f: chain(f, handle.committed))
        if self.consolidator is not None:
            job.committed.add_done_callback(lambda f, s=step: self._committed(s, f))
        for fut in (handle.persisted, handle.committed):
            fut.add_done_callback(lambda f, s=step: self._record_error(s, f))

        def staged(error: BaseException | None) -> None:
            if error is not None:
                pool.release(slab)
                self._fail(handle, error)
                return
            try:
                # Hand over first: once "staged" is visible the snapshot must survive this
                # process (a node agent holds it from here on).
                self.sink.submit(job)
            except BaseException as e:  # noqa: BLE001 - reported through the futures
                pool.release(slab)
                self._fail(handle, e)
                return
            handle.staged.set_result(step)

        events = [threading.Event() for _ in groups]
        stage = StageJob(groups, events, ready, staged)
        self._latest_stage = stage
        self._latest_handle = handle
        self.stager.submit(stage)

    def _pool_for(self, nbytes: int, items: list[TensorItem]) -> HostBufferPool:
        if self.pool is None:
            budget, pin = self.config.host_budget_bytes or max(2 * nbytes, 1), self.config.pin_memory
            if pin is None:
                pin = torch.cuda.is_available() and any(it.tensor.device.type == "cuda" for it in items)
            self.pool = self.sink.host_pool(budget, pin_memory=pin)
            log.info("host snapshot budget %.1f MiB (%s)", budget / 2**20, "pinned" if pin else "pageable")
        if self.config.host_budget_bytes is None:
            self.pool.follow(nbytes)  # the automatic budget grows with the state
        return self.pool

    def _before_step(self, index: int) -> None:
        self._preparing is not None and self._preparing.called(False)  # the loop trains: see prepare
        stage = self._latest_stage
        if stage is None or stage.events[index].is_set():
            return
        t0 = time.perf_counter()
        stage.events[index].wait()
        dt = time.perf_counter() - t0
        self._hook_stall_s += dt
        self.telemetry.hook_stalled(dt)
        if (handle := self._latest_handle) is not None:
            handle.hook_stall_s += dt

    def _committed(self, step: int, fut: Future) -> None:
        every = self.config.keep_every
        if fut.exception() is None and self.consolidator is not None and every and step % every == 0:
            self.consolidator.submit(step)

    def _retention(self, manifest: Manifest) -> None:
        policy = RetentionPolicy(keep_last=self.config.keep_last or 1, keep_every=self.config.keep_every)
        at = {manifest.step: manifest.created_at}  # the step just committed: no manifest read
        result = run_gc(self.storage, policy, measure=False, detached=True, clean_trash=False, committed_at=at)
        if result.deleted:
            log.info("retention removed steps %s", result.deleted)

    def _record_error(self, step: int, fut: Future) -> None:
        if (e := fut.exception()) is None:
            return
        msg = f"checkpoint of step {step} failed: {type(e).__name__}: {e}"
        with self._lock:
            if msg not in self._errors:
                self._errors.append(msg)
                log.error(msg)

    def _fail(self, handle: SnapshotHandle, e: BaseException) -> None:
        for fut in (handle.staged, handle.persisted, handle.committed):
            if not fut.done():
                fut.set_exception(e)

    def _report_errors(self) -> None:
        with self._lock:
            new = self._errors[self._reported :]
            self._reported = len(self._errors)
        if new and self.config.on_error == "raise":
            raise CkptError("; ".join(new))

    def _check_open(self) -> None:
        if self._closed:
            raise CkptError("this Checkpointer is closed")
