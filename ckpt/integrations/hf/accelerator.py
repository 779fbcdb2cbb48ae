"""``save_state``/``load_state`` of an ``accelerate`` training loop, into a ckpt run.

```python
accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
ckptr = AcceleratorCheckpointer(accelerator, "s3://bucket/run1", every_n_steps=100, keep_last=3)
start = step = ckptr.load_state() or 0                # newest committed step + 1; 0: from scratch
for epoch in range(start // len(loader), num_epochs):
    for batch in ckptr.batches(loader, epoch, skip=start - epoch * len(loader)):
        ...forward, accelerator.backward(loss), optimizer.step(), scheduler.step(), optimizer.zero_grad()
        ckptr.save_state(step)                        # returns at once; a snapshot every 100 steps
        step += 1
ckptr.close()
```

One ckpt step holds every model, optimizer and scheduler that ``accelerator.prepare`` returned
(or the ``state`` you pass), the grad scaler, the objects registered with
``accelerator.register_for_checkpointing``, ``accelerator.step`` and every random generator.
Accelerate's own ``save_state`` writes the optimizer and RNG with ``torch.save`` whatever its
hooks do (they can only keep it from writing the model), so this is a wrapper, not a hook: a
step is written once, lazily, and read back without unpickling anything.

:meth:`batches` resumes the data where it stopped: it sets the loader's epoch (a seedable
sampler then gives the same order as the first time), skips the batches trained already, and
sets the random generators again after the loader's iterator drew its seed, before the first
forward, where the uninterrupted loop read them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from accelerate import Accelerator

from ...checkpointer import Checkpointer
from ...handles import SnapshotHandle
from .common import DeferredRNG, pair_optimizer, torch_optimizer


class AcceleratorCheckpointer:
    """Lazy asynchronous checkpoints of everything an ``Accelerator`` prepared; see the module
    docstring. Keyword arguments go to :class:`ckpt.Checkpointer` (``every_n_steps``,
    ``keep_last``, ``keep_every``, ``agent``, ...). ``state``: the objects to checkpoint
    instead of the prepared ones (a dict as for ``Checkpointer.save``); the RNGs and
    ``accelerator.step`` are added to it."""

    def __init__(
        self, accelerator: Accelerator, url: Any, *, state: dict[str, Any] | None = None, **checkpointer_options: Any
    ) -> None:
        self.accelerator = accelerator
        self.checkpointer = Checkpointer(url, **checkpointer_options)
        self._given = dict(state) if state is not None else None
        self._rng = DeferredRNG()
        self._resumed_rng: dict[str, Any] | None = None
        self._state: dict[str, Any] | None = None

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds, by name (built on first use, from what was prepared by then)."""
        if self._state is None:
            acc = self.accelerator
            state = self._given if self._given is not None else self._prepared_state()
            state["rng"] = self._rng
            state["accelerator"] = {"step": acc.step}
            for opt in acc._optimizers:
                self.checkpointer.attach(torch_optimizer(opt))  # optimizer.step() waits for staging
            self._state = state
        return self._state

    def _prepared_state(self) -> dict[str, Any]:
        acc = self.accelerator
        models = [acc.unwrap_model(m) for m in acc._models]
        if not models:
            raise ValueError(
                "AcceleratorCheckpointer: the accelerator has prepared no model yet; call "
                "accelerator.prepare(model, optimizer, ...) first, or pass state="
            )
        state: dict[str, Any] = {}

        def put(kind: str, items: list[Any]) -> None:
            for i, obj in enumerate(items):
                state[kind if len(items) == 1 else f"{kind}_{i}"] = obj

        put("model", models)
        put("optim", [pair_optimizer(models, torch_optimizer(o)) for o in acc._optimizers])
        put("sched", list(acc._schedulers))
        put("custom", list(acc._custom_objects))
        if acc.scaler is not None:
            state["scaler"] = acc.scaler
        return state

    def save_state(self, step: int, *, force: bool = False) -> SnapshotHandle | None:
        """Snapshot as checkpoint ``step`` if it is a checkpoint step (every ``every_n_steps``,
        or ``force``); returns at once. Call it after ``optimizer.step()``."""
        state = self.state()
        state["accelerator"] = {"step": self.accelerator.step}
        return self.checkpointer.save(step, state, force=force)

    def load_state(self, step: int | None = None) -> int | None:
        """Restore the newest committed checkpoint (or ``step``); returns the step to resume
        from (the saved step + 1), or None when the run has none (and changes nothing)."""
        state = self.state()
        resume = self.checkpointer.restore(state, step=step)
        if resume is None:
            return None
        self.accelerator.step = state["accelerator"]["step"]
        self._resumed_rng = self._rng.pending
        self._rng.apply()
        return resume

    def batches(self, dataloader: Any, epoch: int, *, skip: int = 0) -> Iterator[Any]:
        """The batches of ``epoch``, the first ``skip`` of them left out; after :meth:`load_state`
        the random generators are set again once the iterator has drawn its seed (when it
        resumes inside an epoch), so that the next forward draws what it drew the first time."""
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        skip = max(skip, 0)
        loader: Iterable[Any] = self.accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        rng, self._resumed_rng = (self._resumed_rng if skip else None), None
        it = iter(loader)
        first = next(it, _END)
        if rng is not None:
            self._rng.load_state_dict(rng)
            self._rng.apply()
        if first is _END:
            return
        yield first
        yield from it

    def wait(self, timeout: float | None = None) -> None:
        """Block until every checkpoint taken so far is committed or failed."""
        self.checkpointer.wait(timeout)

    def close(self, *, wait: bool = True) -> None:
        self.checkpointer.close(wait=wait)

    def __enter__(self) -> AcceleratorCheckpointer:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(wait=exc[0] is None)


_END = object()
