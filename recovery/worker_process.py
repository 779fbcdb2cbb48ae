"""The worker actor: one process that serves attempt after attempt of a job. It sets up
torch.distributed and runs ``train_fn``; a restart in place interrupts it, cuts its process
group and calls it again with the next attempt (see ``recovery.job``)."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import os
import socket
import threading
import traceback
from collections.abc import Callable
from typing import Any

import torch

from .live import Interrupted, LiveSlot
from .warmup import warm_up
from .worker import RecoveryCheckpointer, Reporter, TrainContext, WorkerSpec

log = logging.getLogger(__name__)


__all__ = ["INTERRUPTED", "Interrupted", "Worker"]

INTERRUPTED = "__recovery_interrupted__"  # what ``Worker.run`` returns for an attempt stopped in place


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in the thread ``thread_id`` at its next Python instruction (None: cancel).

    CPython finds the thread by its id, and a thread being started carries the id of the thread
    starting it until it runs (its state is first in the list): an exception set then lands in
    the new thread, which dies before it says it started, and the thread meant waits in
    ``Thread.start()`` for ever (a Checkpointer starting its threads). So it is set only while
    no thread is being started (``threading``'s limbo empty, under its lock)."""
    import ctypes
    import time

    lock, limbo = getattr(threading, "_active_limbo_lock", None), getattr(threading, "_limbo", None)
    for _ in range(1000):
        if lock is None or limbo is None:
            break
        with lock:
            if not limbo:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                                          ctypes.py_object(exc) if exc else None)
                return
        time.sleep(0.002)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


class Worker:
    """Plain class; :class:`recovery.job.WorkerJob` wraps it with ``ray.remote`` (a threaded actor:
    ``interrupt`` runs beside ``run``) and places one per bundle. One process serves attempt after
    attempt: a restart in place interrupts ``run`` and calls it again with the next attempt."""

    def __init__(self, rank: int, world_size: int, attempt: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.attempt = attempt
        self.ctx: TrainContext | None = None
        self._lock = threading.Lock()
        self._running: int | None = None  # the attempt whose train_fn runs now
        self._thread: int | None = None
        self._stopping: int | None = None
        self._backend: str | None = None
        self._group_fds: set[tuple[int, str]] = set()  # the sockets the current group opened
        self.live = LiveSlot()  # train_fn's live state, kept across attempts for policy heal
        self._store: tuple[int, Any] | None = None  # (port, TCP store) opened for rank 0 of the next attempt
        self._agent_address: str | None = None  # this node's agent, as the last attempt's spec named it
        self._agent: tuple[str, Any] | None = None  # (address, client): told of commits (an agent outside the job)
        self._devices: tuple[str, ...] = ()  # the GPUs a warm standby took over (it holds none of Ray's)
        # A new process warms up from its start (see recovery.warmup), before its first run arrives;
        # that run joins the process group once the warm-up is done, then every rank restores
        # at once: the survivors' restores do not share the node's cores with the
        # replacement's imports (its resume is no sooner: its boot is the critical path).
        self._warming: threading.Thread | None = threading.Thread(target=warm_up, name="worker-warm-up", daemon=True)
        self._warming.start()

    def node_info(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "gpus": ray.get_gpu_ids() or list(self._devices)}

    def warm(self, train_fn: Callable[[TrainContext], Any]) -> dict[str, Any]:
        """A hot spare's boot (``recovery.spares``): ``train_fn`` arrived deserialized (its modules
        imported); what ``run`` imports besides is imported now. Its node info."""
        del train_fn
        self._warmed()
        return self.node_info()

    def _warmed(self) -> None:
        """Wait for the warm-up started by ``__init__`` (in slices: an interrupt still lands)."""
        thread = self._warming
        while thread is not None and thread.is_alive():
            thread.join(0.05)
        self._warming = None

    def open_store(self, world_size: int, timeout_s: float) -> int:
        """Rank 0's side of the next attempt's rendezvous, opened before ``run``: the TCP store
        the other ranks connect to. (A rank that connects before the store listens retries after
        a backoff: ~0.8 s of every restart, since the ranks start ``run`` together.) Its port."""
        import ray
        import torch.distributed as dist

        self._store = None  # the previous attempt's (its group is gone)
        store = dist.TCPStore(ray.util.get_node_ip_address(), 0, world_size, True,  # port 0: the OS picks one
                              timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        self._store = (store.port, store)
        return store.port

    def interrupt(self, attempt: int, keep_state: bool = False) -> str:
        """Stop ``attempt``'s ``train_fn`` now, keeping the process (and its CUDA context): raise
        :class:`Interrupted` in it and, on NCCL, abort the process group so that a collective
        waiting for a lost peer returns (on gloo it fails as soon as a peer closes). ``run`` then
        leaves the process group and returns :data:`INTERRUPTED`. ``keep_state`` (policy heal):
        no exception is raised at an arbitrary instruction, which could land inside an optimizer
        step; the group is cut (a collective fails) and ``ctx.report`` raises it, between steps."""
        with self._lock:
            if self._running != attempt or self._thread is None:
                return "idle"
            self._stopping = attempt
            self._cut_group()
            if keep_state:
                self.live.stop.set()
            if (ctx := self.ctx) is not None:  # a save waiting for host memory (commits stalled by the loss) gives up
                ctx.checkpointer.interrupt()
            if keep_state:
                return "stopping"
            _raise_in(self._thread, Interrupted)
        return "interrupted"

    def force_interrupt(self, attempt: int) -> str:
        """Raise :class:`Interrupted` in ``attempt``'s training thread at once (after a stop with
        ``keep_state`` that did not end it): its live state is doubtful from then on."""
        with self._lock:
            if self._running != attempt or self._thread is None:
                return "idle"
            self.live.forced = True
            _raise_in(self._thread, Interrupted)
            if (ctx := self.ctx) is not None:  # out of a wait for host memory: the exception lands
                ctx.checkpointer.interrupt()
        return "interrupted"

    def live_report(self) -> dict[str, Any]:
        """:class:`recovery.live.LiveState` of the attempt that ended (as a dict)."""
        ended = self.live.ended
        if ended is None:  # never ran, or still running: nothing to heal from here
            return {"rank": self.rank, "step": None, "clean": False, "why": "no attempt ended in this process"}
        return ended.to_dict()

    def _cut_group(self) -> None:
        """Make every collective of this process's group fail now, here and in its peers: NCCL
        aborts; gloo has no abort that reaches its peers (its sockets close only when the group
        is freed, and the C++ side may hold it), so the sockets the group opened are shut down."""
        if self._backend == "nccl":
            try:
                import torch.distributed.distributed_c10d as c10d

                c10d._abort_process_group()
            except Exception:
                log.debug("aborting the process group failed", exc_info=True)
        fds, self._group_fds = self._group_fds, set()
        for fd, inode in fds:
            try:
                if os.readlink(f"/proc/self/fd/{fd}") != inode:
                    continue  # closed and reused meanwhile: not the group's any more
                sock = socket.socket(fileno=fd)
                try:
                    # Connections only (a pair of the group, the store): a listening socket shut
                    # under gloo's event loop makes it throw and terminate the process.
                    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.getpeername():
                        sock.shutdown(socket.SHUT_RDWR)
                finally:
                    sock.detach()  # the group still owns the descriptor
            except OSError:
                pass

    def stack(self) -> str:
        """Where the training thread is now (its Python stack), for a worker that would not stop."""
        import sys

        with self._lock:
            tid = self._thread
        frame = sys._current_frames().get(tid) if tid is not None else None
        return "".join(traceback.format_stack(frame)[-12:]) if frame is not None else "(not training)"

    def committed(self, run_url: str, step: int, save_id: str) -> None:
        """The coordinator committed ``step``: this node's agent, run outside the job (a DaemonSet,
        a systemd unit), is told over its socket, through this worker of its node."""
        from agent.trainer.client import AgentClient

        with self._lock:
            address = self._agent_address
            if address is None:
                return
            if self._agent is None or self._agent[0] != address:
                if self._agent is not None:
                    self._agent[1].close()
                self._agent = (address, AgentClient(address, timeout_s=10))
            client = self._agent[1]
        client.notice_commit(run_url, step, save_id)

    def run(self, train_fn: Callable[[TrainContext], Any], spec: WorkerSpec, attempt: int | None = None,
            rank: int | None = None, world_size: int | None = None) -> Any:
        import torch.distributed as dist

        if attempt is not None:
            self.attempt = attempt
        if rank is not None and world_size is not None:  # a heal that shrank the job renumbers the ranks
            self.rank, self.world_size = rank, world_size
        self.live.begin(keep=spec.heal is not None)
        self._agent_address = spec.agent
        _leave_group()  # the broken group of an attempt stopped in place
        if spec.devices is not None:  # a warm standby taking over a lost process's rank (its GPUs)
            _take_devices(spec.devices)
            self._devices = spec.devices
        if spec.backend == "nccl" and torch.cuda.is_available():
            torch.cuda.set_device(0)  # Ray makes the worker's GPU the only visible one
            device = torch.device("cuda", 0)
        else:
            device = torch.device("cpu")
        torch.set_num_threads(spec.num_threads)
        reporter: Reporter | None = None
        ckptr: RecoveryCheckpointer | None = None
        with self._lock:
            self._running, self._thread, self._stopping, self._backend = self.attempt, threading.get_ident(), None, \
                spec.backend
        try:
            try:
                # A new process (a replacement, or a standby still booting) finishes its warm-up
                # first: its peers wait in the rendezvous, then every rank restores at once,
                # none of them beside its imports on the node's cores.
                self._warmed()
                before = _sockets()
                timeout = datetime.timedelta(seconds=spec.collective_timeout_s)
                opened, self._store = self._store, None
                if self.rank == 0 and opened is not None and opened[0] == spec.master_port:  # open_store's
                    dist.init_process_group(spec.backend, store=dist.PrefixStore("default_pg", opened[1]),
                                            rank=0, world_size=self.world_size, timeout=timeout)
                else:
                    dist.init_process_group(spec.backend, init_method=f"tcp://{spec.master_addr}:{spec.master_port}",
                                            rank=self.rank, world_size=self.world_size, timeout=timeout)
                with self._lock:
                    self._group_fds = _sockets() - before
                reporter = Reporter(spec.coordinator, self.attempt, self.rank, self.world_size, spec.node,
                                    spec.heartbeat_interval_s, relay=spec.relay)
                ck = spec.checkpoint
                options = dict(ck.options)
                options.setdefault("commit_timeout_s", ck.commit_timeout_s)
                ckptr = RecoveryCheckpointer(spec.storage, reporter=reporter, agent=spec.agent,
                                             restore_step=spec.restore_step if spec.heal is None else None,
                                             holders=spec.holders, every_n_steps=ck.every_n_steps, keep_last=None,
                                             **options)
                reporter.heartbeat(None, {}, force=True)
                self.ctx = TrainContext(self.rank, self.world_size, self.attempt, spec.restore_step, ckptr, device,
                                        node=spec.node, coordinator_name=spec.coordinator_name, heal=spec.heal,
                                        _reporter=reporter, _live=self.live)
                result = train_fn(self.ctx)
                self.live.finish(self.rank, None)
                ckptr.close(wait=True)
            finally:
                with self._lock:
                    stopped = self._stopping == self.attempt
                    self._running = self._thread = None
                    _raise_in(threading.get_ident(), None)  # an interrupt not delivered yet is void now
        except BaseException as e:
            if self.live.ended is None:
                self.live.finish(self.rank, e)  # before the frames go: where it was raised tells
            # Peers still blocked in a collective with this process fail as soon as its sockets
            # close, which is when the last reference to the process group goes: the frames of
            # the traceback (a DDP model, a collective's arguments) and the Checkpointer hold it.
            traceback.clear_frames(e.__traceback__)
            with self._lock:
                self._cut_group()
            self.ctx = None
            if reporter is not None:
                # First: the abandoned checkpointer's handles fail, but what they staged is the
                # node agent's now and may still be committed; nothing of it is reported.
                reporter.close()
            if ckptr is not None and self.live.state is not None:
                ckptr.wait_staged(30.0)  # the live state goes on training: its snapshots copied first
            _abandon(ckptr)
            ckptr = None
            _leave_group()
            if stopped or isinstance(e, Interrupted):
                return INTERRUPTED
            raise
        finally:
            if reporter is not None:
                reporter.close()
        self.ctx = None
        dist.destroy_process_group()
        return result


def _take_devices(devices: tuple[str, ...]) -> None:
    """Make ``devices`` (GPU ids as Ray names them) this process's visible GPUs: a warm standby
    holds none of Ray's and has never initialised CUDA, so the lost process's GPUs become its
    own (its bundle still holds them for the job)."""
    visible = ",".join(devices)
    if torch.cuda.is_initialized() and os.environ.get("CUDA_VISIBLE_DEVICES") != visible:
        raise RuntimeError(f"this worker initialised CUDA before it was given GPU(s) {visible}")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    if torch.version.cuda is not None and (seen := torch._C._cuda_getDeviceCount()) != len(devices):
        raise RuntimeError(f"this worker sees {seen} GPU(s) after it was given {visible}: CUDA fixed its devices "
                           "before the handover (a backward or an optimizer step ran first)")


def _sockets() -> set[tuple[int, str]]:
    """(descriptor, socket inode) of every socket this process has open (Linux; else none)."""
    out: set[tuple[int, str]] = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add((int(fd), target))
    return out


def _abandon(ckptr: RecoveryCheckpointer | None) -> None:
    """An attempt that ends by an error or an interrupt: what it staged stays with the node agent
    (or is lost with an in-process sink, as when the process dies); its threads stop."""
    if ckptr is None:
        return
    ckptr.group = dataclasses.replace(ckptr.group, pg=None)  # it must not keep the process group alive

    def close() -> None:  # off the worker's thread: a node agent's session may take seconds to end
        try:
            ckptr.close(wait=False)
        except BaseException:
            log.debug("closing the checkpointer of an ended attempt failed", exc_info=True)

    threading.Thread(target=close, name="recovery-abandon", daemon=True).start()


def _leave_group() -> None:
    """Destroy this process's default process group, if any (broken or not): its sockets close,
    so peers still blocked in a collective with this process fail at once instead of waiting for
    the collective timeout."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            log.debug("destroying the process group failed", exc_info=True)
    gc.collect()  # references in cycles (a model, the traceback) go now, and the sockets with them
