"""Device-to-host copies of snapshots in the background.

Parameters and optimizer state do not change between two optimizer steps, so their copy to
host memory can overlap the next forward and backward pass. The stager copies one snapshot's
tensors group by group (one group per attached optimizer, in attach order) and signals each
group when it is done: an optimizer's pre-step hook waits only for its own group.

On CUDA the copies run on a side stream that first waits for an event recorded on the
compute stream at ``save`` (so they see every kernel queued before it), into pinned memory;
the snapshot keeps a reference to every source tensor until its copy finished, so the caching
allocator cannot reuse the memory under the copy. On CPU a background thread does the copies
(``copy_`` releases the GIL). The copies of a group go in one call per device: every call
that releases the GIL must take it back, behind the training loop's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(eq=False)
class StageJob:
    groups: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per group: (source, host destination)
    events: list[threading.Event]
    ready: Any = None  # torch.cuda.Event recorded on the compute stream at save, or None
    on_done: Callable[[BaseException | None], None] = lambda e: None
    done: threading.Event = field(default_factory=threading.Event)


def step_pre_hook(wait: Callable[[], None]) -> Callable[[Any, tuple, dict[str, Any]], tuple[tuple, dict] | None]:
    """An optimizer step pre-hook that runs ``wait`` just before the update.

    A closure passed to ``step`` (Lightning's automatic optimization, LBFGS) runs forward and
    backward inside ``step``, before any parameter changes: the wait then moves after the
    closure, so that the host copy still overlaps forward and backward. Without a closure the
    wait runs at once."""

    def hook(optimizer: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        # torch passes step's own arguments: ``args[0]`` is the optimizer, a closure follows it.
        closure = kwargs["closure"] if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if not callable(closure):
            wait()
            return None

        def closure_then_wait() -> Any:
            out = closure()
            wait()
            return out

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_wait}
        return (args[0], closure_then_wait, *args[2:]), kwargs

    return hook


def copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]], *, non_blocking: bool) -> None:
    """``dst.copy_(src)`` for every (source, destination) pair, in one call where torch has
    ``_foreach_copy_`` (same semantics, dtype casts included)."""
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None and len(pairs) > 1:
        foreach([d for _, d in pairs], [s for s, _ in pairs], non_blocking=non_blocking)
        return
    for src, dst in pairs:
        dst.copy_(src, non_blocking=non_blocking)


class Stager:
    """One background thread running stage jobs in order."""

    def __init__(self) -> None:
        self._q: queue.Queue[StageJob | None] = queue.Queue()
        self._streams: dict[int, Any] = {}
        self._thread = threading.Thread(target=self._loop, name="ckpt-stage", daemon=True)
        self._thread.start()

    def submit(self, job: StageJob) -> None:
        self._q.put(job)

    def _stream(self, device: torch.device) -> Any:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self._streams:
            self._streams[idx] = torch.cuda.Stream(device=idx)
        return self._streams[idx]

    def _loop(self) -> None:
        while (job := self._q.get()) is not None:
            error: BaseException | None = None
            try:
                for group, event in zip(job.groups, job.events):
                    self._copy_group(group, job.ready)
                    event.set()
            except BaseException as e:  # noqa: BLE001 - reported through on_done
                error = e
                log.error("staging failed: %s", e)
            finally:
                for event in job.events:  # never leave a pre-step hook waiting
                    event.set()
            job.done.set()
            job.on_done(error)

    def _copy_group(self, group: list[tuple[torch.Tensor, torch.Tensor]], ready: Any) -> None:
        # Per device: one wait on the compute stream's event, every copy queued, one event at
        # the end (a few CUDA calls per group, not per tensor: this thread shares the GIL with
        # the training loop's kernel launches).
        # The copies themselves in one call per device (each call gives up the GIL and takes it
        # back, behind the training loop: one per tensor was 600 waits per checkpoint).
        by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for src, dst in group:
            by_device.setdefault(src.device, []).append((src, dst))
        done = []
        for device, pairs in by_device.items():
            if device.type != "cuda":
                copy_all(pairs, non_blocking=False)
                continue
            stream = self._stream(device)
            if ready is not None:
                stream.wait_event(ready)
            with torch.cuda.stream(stream):
                copy_all(pairs, non_blocking=True)
            done.append(stream.record_event())
        for ev in done:
            ev.synchronize()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
