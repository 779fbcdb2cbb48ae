"""``CkptCheckpointIO``: Lightning's checkpoints in ckpt's format, saved lazily.

```python
io = CkptCheckpointIO()
trainer = L.Trainer(plugins=[io], callbacks=[io.callback, ModelCheckpoint(dirpath="s3://bucket/run")])
```

Lightning calls ``save_checkpoint(checkpoint, path)`` on global rank 0 only (single device, DDP)
with the whole checkpoint dict. The dict goes to a :class:`ckpt.Checkpointer` working for rank 0
alone: ``save_checkpoint`` takes references to the parameters and the optimizer state and
returns; their copy to host memory runs on the engine's staging thread while the next batch's
forward and backward run, and the optimizer's next update waits only for that copy (the
Checkpointer's step pre-hook, which waits after Lightning's closure). Nothing of them is cloned
on the training thread. Tensors training changes outside the optimizer (buffers, a callback's
``best_model_score``) and the plain values are copied during the call. The host copy is then
written and committed in the background into the folder of ``path`` (:mod:`.sink`).

``io.callback`` hands the trainer's optimizers to the engine at the start of training; without
it every tensor is copied during ``save_checkpoint`` (a warning says so).

Paths: ``.../epoch=0-step=10.ckpt`` is a folder, a ckpt run holding one step, the global step
(``epoch=0-step=10.ckpt/000000000010/``): ``ckpt ls``, ``ckpt.read`` and ``ckpt export`` take the
path as it is. A path saved again (``last.ckpt``) gets its new step committed first, then the
older one deleted. ``remove_checkpoint`` deletes the folder (commit points first), after any
write of it still under way. Any fsspec URL works.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import wait as wait_futures
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer

from ckpt import format as fmt
from ckpt.api import read
from ckpt.checkpointer import Checkpointer
from ckpt.dist import Group
from ckpt.errors import CheckpointNotFoundError, CkptError, UnsupportedValueError
from ckpt.handles import SnapshotHandle
from ckpt.io import DEFAULT_IO_THREADS
from ckpt.sink import SinkConfig
from ckpt.storage import RetryPolicy, open_storage
from ckpt.version import library_versions

from ._tree import from_ckpt, map_location, split_url, to_ckpt
from .sink import FolderSink, Target, remove_folder

log = logging.getLogger(__name__)


class CkptCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` writing ckpt checkpoints lazily; see the module docstring.

    Options: ``allow_pickle`` (store values JSON cannot hold, pickled; needed again to load
    them; off: such a value is refused with its path), ``host_budget_bytes`` (host memory for
    snapshots; default twice one snapshot: the top-k and ``last`` checkpoints of one step),
    ``on_error`` (``"raise"``: a background failure is raised at the next save or at
    ``teardown``; ``"warn"``: logged), ``io_threads``, ``durable``, ``storage_options`` (fsspec),
    ``retry``, ``commit_timeout_s``.
    """

    def __init__(
        self,
        *,
        allow_pickle: bool = False,
        host_budget_bytes: int | None = None,
        on_error: str = "raise",
        io_threads: int = DEFAULT_IO_THREADS,
        durable: bool = True,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        commit_timeout_s: float = 600.0,
    ) -> None:
        if on_error not in ("raise", "warn"):
            raise ValueError(f"CkptCheckpointIO(on_error=...) must be 'raise' or 'warn', got {on_error!r}")
        if host_budget_bytes is not None and host_budget_bytes < 1:
            raise ValueError("CkptCheckpointIO(host_budget_bytes=...) must be >= 1 or None")
        self.allow_pickle = allow_pickle
        self.host_budget_bytes = host_budget_bytes
        self.on_error = on_error
        self.io_threads = io_threads
        self.durable = durable
        self.storage_options = storage_options
        self.retry = retry
        self.commit_timeout_s = commit_timeout_s
        self.callback = AttachOptimizers(self)
        self._optimizers: list[torch.optim.Optimizer] = []
        self._engine: Checkpointer | None = None
        self._sink: FolderSink | None = None
        self._pending: dict[str, SnapshotHandle] = {}  # folder URL -> its latest snapshot
        self._ticket = 0
        self._lock = threading.Lock()
        self._warned = False

    # -- Lightning's CheckpointIO ------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Snapshot ``checkpoint`` as the folder ``path`` (step: its ``global_step``); returns
        before the parameters and optimizer state are copied (see the module docstring)."""
        if storage_options is not None:
            raise TypeError(
                "CkptCheckpointIO.save_checkpoint(storage_options=...) is not supported: pass "
                "storage_options=... to CkptCheckpointIO(...), it applies to every checkpoint"
            )
        url = _url(path)
        step = checkpoint.get("global_step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(
                f"the checkpoint for {url} has no usable 'global_step' ({step!r}); "
                "CkptCheckpointIO stores a checkpoint as that step of the folder"
            )
        tree = to_ckpt(checkpoint, allow_pickle=self.allow_pickle)
        if "://" not in url:
            # The folder exists when the call returns, as Lightning's file would: ModelCheckpoint
            # checks names with exists() and links last.ckpt to it (save_last="link").
            os.makedirs(url, exist_ok=True)
        engine, sink = self._started(url)
        self._report(sink)
        with self._lock:
            self._ticket += 1
            ticket = self._ticket
        sink.expect(ticket, Target(url, step))
        try:
            handle = engine.save(ticket, tree, force=True)
        except BaseException:
            sink.forget()
            raise
        if handle is not None:
            self._pending[url] = handle

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """A fresh dict of the newest committed step of the folder ``path`` (waiting for a
        write of it still under way). Nothing is unpickled unless ``allow_pickle``; a file
        written by ``torch.save`` (Lightning's own format) is read with ``weights_only=True``."""
        url = _url(path)
        self._wait_for(url)
        if os.path.isfile(url):
            return _torch_load(url, map_location)
        storage = open_storage(url, storage_options=self.storage_options, retry=self.retry)
        steps = fmt.committed_steps(storage)
        if not steps:
            raise CheckpointNotFoundError(
                f"no committed checkpoint in {url}: `ckpt ls {url}` shows what is there "
                "(a save that did not finish leaves an incomplete step)"
            )
        tree = read(storage, step=steps[-1], allow_pickle=self.allow_pickle, io_threads=self.io_threads)
        return _map(from_ckpt(tree), map_location)

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the folder ``path``: in the background after a write of it under way, else now."""
        url = _url(path)
        self._pending.pop(url, None)
        if self._sink is not None:
            self._sink.remove(url)
        else:
            remove_folder(url, storage_options=self.storage_options, retry=self.retry)

    def teardown(self) -> None:
        """Wait until every checkpoint is committed and every removal done; stop the threads.
        Raises the background failures (``on_error="raise"``). The object can be used again."""
        engine, sink = self._engine, self._sink
        self._engine, self._sink, self._pending, self._optimizers = None, None, {}, []
        if engine is None or sink is None:
            return
        errors: list[str] = []
        try:
            engine.close(wait=True)
        except CkptError as e:
            errors.append(str(e))
        finally:
            sink.close(wait=True)
            for target in sink.forget():
                if target.remove_after:
                    remove_folder(target.url, storage_options=self.storage_options, retry=self.retry)
        errors += sink.errors()
        if errors and self.on_error == "raise":
            raise CkptError("; ".join(errors))
        for msg in errors:
            log.warning(msg)

    # -- the engine --------------------------------------------------------------------------

    def attach(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Let the parameters and state of ``optimizers`` be copied lazily (``io.callback`` calls it)."""
        for opt in optimizers:
            opt = getattr(opt, "_optimizer", opt)  # a LightningOptimizer wraps the torch one
            if not any(o is opt for o in self._optimizers):
                self._optimizers.append(opt)
                if self._engine is not None:
                    self._engine.attach(opt)

    def wait(self) -> None:
        """Block until every checkpoint taken so far is committed (or failed)."""
        futures = [h.committed for h in self._pending.values()]
        wait_futures(futures)

    def _started(self, url: str) -> tuple[Checkpointer, FolderSink]:
        if self._engine is not None and self._sink is not None:
            return self._engine, self._sink
        sink = FolderSink(
            SinkConfig(
                io_threads=self.io_threads,
                durable=self.durable,
                commit_timeout_s=self.commit_timeout_s,
                library_versions=library_versions(),
            ),
            storage_options=self.storage_options,
            retry=self.retry,
        )
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        # Lightning saves on global rank 0 only: the engine works for that rank alone, no collective.
        engine = Checkpointer(
            split_url(url)[0],
            sink=sink,
            process_group=Group(0, 1, rank, (rank,)),
            every_n_steps=1,
            keep_last=None,
            consolidate="never",
            on_error=self.on_error,
            host_budget_bytes=self.host_budget_bytes,
            allow_pickle=self.allow_pickle,
            io_threads=self.io_threads,
            durable=self.durable,
            storage_options=self.storage_options,
            retry=self.retry,
            commit_timeout_s=self.commit_timeout_s,
        )
        for opt in self._optimizers:
            engine.attach(opt)
        if not self._optimizers and not self._warned:
            self._warned = True
            log.warning(
                "CkptCheckpointIO has no optimizer: every tensor is copied during save_checkpoint. Pass "
                "io.callback to the Trainer's callbacks so that parameters and optimizer state are copied "
                "lazily, overlapping the next forward and backward"
            )
        self._engine, self._sink = engine, sink
        return engine, sink

    def _wait_for(self, url: str) -> None:
        handle = self._pending.get(url)
        if handle is not None:
            wait_futures([handle.committed])
            if handle.error is not None:
                raise CkptError(f"the checkpoint {url} was not written: {handle.error}") from handle.error

    def _report(self, sink: FolderSink) -> None:
        errors = sink.errors()
        if errors and self.on_error == "raise":
            raise CkptError("; ".join(errors))
        for msg in errors:
            log.warning(msg)


class AttachOptimizers(Callback):
    """Hands the trainer's optimizers to a :class:`CkptCheckpointIO` when training starts (on
    every rank; only global rank 0 saves)."""

    def __init__(self, io: CkptCheckpointIO) -> None:
        self.io = io

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.strategy.checkpoint_io is not self.io:
            raise CkptError(
                "io.callback belongs to a CkptCheckpointIO that is not the trainer's checkpoint IO: "
                "pass the same object as L.Trainer(plugins=[io], callbacks=[io.callback])"
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.io.attach(list(trainer.optimizers))


def _url(path: Any) -> str:
    return os.fspath(path) if isinstance(path, os.PathLike) else str(path)


def _map(tree: dict[str, Any], location: Any) -> dict[str, Any]:
    return map_location(tree, location)


def _torch_load(path: str, location: Any) -> dict[str, Any]:
    try:
        return torch.load(path, map_location=location, weights_only=True)
    except Exception as e:
        raise UnsupportedValueError(
            f"{path} is a file written by torch.save that torch.load(weights_only=True) refuses ({e}); loading it "
            "would run code from the file. Load it with Lightning's TorchCheckpointIO if you trust it"
        ) from e
