"""Ray Train sees ckpt's committed steps as pointer checkpoints, and resumes from them.

```python
def train_fn(config):                      # on every Ray Train worker
    ckptr = ckpt.Checkpointer(url, every_n_steps=100, keep_last=None)   # Ray owns retention
    reporter = RayTrainReporter(ckptr)
    start = reporter.restore(state) or 0   # from ray.train.get_checkpoint(), resharded
    ckptr.attach(optimizer)
    for step in range(start, total):
        ...
        ckptr.save(step, state)            # returns at once; commits later
        reporter.report(step, {"loss": loss})   # every worker, as often as it likes
    reporter.finish()                      # waits for the last commit and reports it
    ckptr.close()
```

The order of a report (``report`` on every worker, the same number of times: Ray Train's
``ray.train.report`` is a collective):

1. Rank 0 remembers the metrics of a step it saved, for that step's pointer.
2. Rank 0 deletes the steps Ray no longer lists (see :mod:`.retention`), once per pointer it
   reported earlier: by then Ray has registered that report and applied ``num_to_keep``.
3. Every worker calls ``ray.train.report``; rank 0 attaches the pointer of the oldest step
   committed and not reported yet (a lazy save commits some steps later, so its pointer goes
   with a later report), with the metrics of that step and ``ckpt_step``. Steps are reported
   in order, each once; ``finish`` reports what is left.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from typing import Any

from ... import format as fmt
from ...checkpointer import Checkpointer
from ...errors import CkptError, FormatError
from ...handles import SnapshotState
from ...io import load_step
from ...restore import read_threads
from ...retention import delete_step
from ...stateful import expand
from ...storage import open_storage
from .pointer import STEP_METRIC, Pointer, read_pointer, write_pointer_dir
from .retention import claim_root, steps_to_delete

log = logging.getLogger(__name__)

_UPLOAD_MODES = ("sync", "async")


class RayTrainReporter:
    """Reports a :class:`ckpt.Checkpointer`'s committed steps to Ray Train as pointer
    checkpoints and restores from the one Ray hands back; see the module docstring.

    ``upload_mode``: how Ray uploads the pointer directory (``"sync"``: before ``report``
    returns; ``"async"``: in the background). Either is cheap, a pointer is one small file;
    the tensors were written by every rank through the Checkpointer already.
    ``listing_timeout_s``: how long rank 0 waits for Ray Train's list of the checkpoints it
    keeps before deleting what it no longer lists (on timeout, nothing newer is deleted).
    """

    def __init__(
        self, checkpointer: Checkpointer, *, upload_mode: str = "sync", listing_timeout_s: float = 600.0
    ) -> None:
        import ray.train

        if not hasattr(ray.train, "get_all_reported_checkpoints") or not hasattr(ray.train, "CheckpointUploadMode"):
            raise CkptError(
                f"ckpt.integrations.ray_train needs the Ray Train v2 API (Ray {ray.__version__} runs the v1 API here): "
                "install ray[train]>=2.60 and leave RAY_TRAIN_V2_ENABLED unset (or set it to 1)"
            )
        if not isinstance(checkpointer, Checkpointer):
            raise TypeError(f"RayTrainReporter needs a ckpt.Checkpointer, got {type(checkpointer).__name__}")
        if checkpointer.config.keep_last is not None:
            raise ValueError(
                f"the Checkpointer has keep_last={checkpointer.config.keep_last}: with Ray Train, retention belongs "
                "to Ray (RunConfig(checkpoint_config=CheckpointConfig(num_to_keep=...))) and ckpt deletes a step "
                "once Ray no longer lists its pointer; create the Checkpointer with keep_last=None"
            )
        if checkpointer.config.commit_by != "rank0":
            raise ValueError(
                "RayTrainReporter needs a Checkpointer with commit_by='rank0' (it reports what rank 0 sees committed)"
            )
        if upload_mode not in _UPLOAD_MODES:
            raise ValueError(f"RayTrainReporter.upload_mode must be one of {_UPLOAD_MODES}, got {upload_mode!r}")
        if not listing_timeout_s > 0:
            raise ValueError(f"RayTrainReporter.listing_timeout_s must be > 0, got {listing_timeout_s!r}")
        context = ray.train.get_context()
        if checkpointer.group.world != context.get_world_size() or checkpointer.group.rank != context.get_world_rank():
            raise ValueError(
                f"the Checkpointer's process group (rank {checkpointer.group.rank} of {checkpointer.group.world}) is "
                f"not Ray Train's worker group (rank {context.get_world_rank()} of {context.get_world_size()}): "
                "create it after TorchTrainer set up torch.distributed, without process_group="
            )
        self.checkpointer = checkpointer
        self.upload_mode = upload_mode
        self.listing_timeout_s = float(listing_timeout_s)
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.experiment = context.get_experiment_name()
        self.url = checkpointer.storage.url
        self.last_reported: int | None = None  # the newest step whose pointer this process reported
        self.restored_from: Pointer | None = None
        self._metrics: dict[int, dict[str, Any]] = {}
        self._sweep_due = False
        self._restored = False

    # -- restore ------------------------------------------------------------------------------

    def restore(self, state: dict[str, Any], *, start_from: Any = None, strict: bool = True) -> int | None:
        """Load the step that ``ray.train.get_checkpoint()`` points to into ``state``,
        resharded to this job's layout (any number of workers). Returns the step to resume
        from, or ``None`` when there is nothing to resume from. Every worker calls it.

        ``start_from``: where a new run starts when Ray has no checkpoint of its own yet: a
        pointer checkpoint of an earlier run (a Ray ``Checkpoint``, e.g. its
        ``Result.checkpoint`` passed in ``train_loop_config``, or a :class:`Pointer`). Ray
        Train v2 deprecates ``TorchTrainer(resume_from_checkpoint=...)`` in favour of this.
        The earlier run's step is read from its root; this run writes into its own.

        Before anything loads, rank 0 claims the ckpt root for this Ray Train run and deletes
        the steps Ray does not list: those of an attempt that died before reporting them,
        which this attempt saves again."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            pointer: Pointer | None = read_pointer(checkpoint)
        elif start_from is None or isinstance(start_from, Pointer):
            pointer = start_from
        else:
            pointer = read_pointer(start_from)
        group = self.checkpointer.group
        error = None
        if group.rank == 0:
            try:
                self._prepare_root(pointer)
            except (CkptError, OSError) as e:
                error = f"{type(e).__name__}: {e}"
        error = group.broadcast(error)  # every rank fails alike, and none saves before the root is clean
        if error is not None:
            raise CkptError(f"ckpt root {self.url} cannot be resumed into: {error}")
        self.restored_from = pointer
        self._restored = True
        if pointer is None:
            return None
        log.info(
            "resuming from ckpt step %d of %s (saved by %d workers; %d now)",
            pointer.step,
            pointer.url,
            pointer.world_size,
            self.world_size,
        )
        if pointer.url == self.url:
            self.last_reported = pointer.step
            return self.checkpointer.restore(state, step=pointer.step, strict=strict)
        return self._restore_other_root(state, pointer, strict=strict)

    def _prepare_root(self, pointer: Pointer | None) -> None:
        storage = self.checkpointer.storage
        claim_root(storage, self.experiment)
        listed = self._listed_steps()
        if pointer is not None and pointer.url == self.url:
            listed.add(pointer.step)
        self._delete(steps_to_delete(fmt.list_steps(storage), listed, restoring=True), "not listed by Ray Train")

    def _restore_other_root(self, state: dict[str, Any], pointer: Pointer, *, strict: bool) -> int:
        cfg = self.checkpointer.config
        storage = open_storage(pointer.url, storage_options=cfg.storage_options, retry=cfg.retry)
        expanded = expand(state)
        load_step(
            storage,
            expanded.tree,
            pointer.step,
            rank=self.checkpointer.group.rank,
            writer=self.checkpointer.writer,
            strict=strict,
            allow_pickle=cfg.allow_pickle,
            threads=read_threads(storage, pointer.step, cfg.io_threads),
        )
        expanded.apply()
        self.checkpointer.prepare(state)
        return pointer.step + 1

    # -- report -------------------------------------------------------------------------------

    def report(self, step: int, metrics: dict[str, Any] | None = None) -> int | None:
        """Report ``metrics`` of ``step`` to Ray Train, with the pointer of the oldest step
        committed and not reported yet (rank 0). Every worker calls it, the same number of
        times. Returns the step whose pointer this call reported (rank 0), else ``None``.

        Call it at every checkpoint step at least (and as often as you like between): one
        call reports at most one pointer, and the pointer of a step carries the metrics given
        with that step, which is what Ray's ``checkpoint_score_attribute`` ranks it by."""
        self._check_restored()
        metrics = dict(metrics or {})
        if self.rank == 0:
            saved = {row["step"] for row in self.checkpointer.status().checkpoints}
            if step in saved and (self.last_reported is None or step > self.last_reported):
                self._metrics[step] = metrics
        return self._report(metrics)

    def finish(self, metrics: dict[str, Any] | None = None, *, timeout: float | None = None) -> int | None:
        """Wait until every checkpoint taken so far is committed (or failed), report the
        pointers not reported yet and apply Ray's retention once more. Every worker calls it
        once, after the loop and before ``Checkpointer.close``. It makes one
        ``ray.train.report`` per pointer left on every worker (one, with ``metrics``, when
        none is left and ``metrics`` are given). Returns the last step reported (rank 0)."""
        self._check_restored()
        self.checkpointer.wait(timeout)
        pending = len(self._unreported()) if self.rank == 0 else None
        # Every worker makes the same number of calls: ray.train.report is a collective.
        count = self.checkpointer.group.broadcast(pending)
        if metrics is not None:
            count = max(count, 1)
        reported = None
        for _ in range(count):
            step = self._report(dict(metrics or {}))
            reported = reported if step is None else step
        if self.rank == 0 and self._sweep_due:
            self._sweep()
        return reported

    def _check_restored(self) -> None:
        if not self._restored:
            raise CkptError(
                "call RayTrainReporter.restore(state) on every worker before the training loop: it "
                "resumes from Ray Train's checkpoint and claims the ckpt root for this run"
            )

    def _report(self, metrics: dict[str, Any]) -> int | None:
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return None
        if self._sweep_due:
            self._sweep()
        unreported = self._unreported()
        step = unreported[0] if unreported else None
        if step is None:
            ray.train.report(metrics)
            return None
        pointer = Pointer(url=self.url, step=step, world_size=self.world_size, experiment=self.experiment)
        own = self._metrics.pop(step, metrics)
        directory = tempfile.mkdtemp(prefix="ckpt-pointer-")
        try:
            write_pointer_dir(directory, pointer)
            mode = (
                ray.train.CheckpointUploadMode.ASYNC
                if self.upload_mode == "async"
                else ray.train.CheckpointUploadMode.SYNC
            )
            ray.train.report(
                {**own, STEP_METRIC: step},
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=f"ckpt_step_{fmt.step_dir(step)}",
                checkpoint_upload_mode=mode,
            )
        finally:
            if self.upload_mode == "sync":  # async: Ray deletes it after the upload
                shutil.rmtree(directory, ignore_errors=True)
        self.last_reported = step
        self._metrics = {s: m for s, m in self._metrics.items() if s > step}
        self._sweep_due = True
        return step

    def _unreported(self) -> list[int]:
        """The committed steps newer than the last pointer, oldest first. (A step that commits
        after a newer one was reported is left out: it is deleted as Ray never lists it.)"""
        return sorted(
            row["step"]
            for row in self.checkpointer.status().checkpoints
            if row["state"] == SnapshotState.COMMITTED.value
            and (self.last_reported is None or row["step"] > self.last_reported)
        )

    # -- retention ------------------------------------------------------------------------------

    def _sweep(self) -> None:
        """Delete the committed steps whose pointers Ray Train no longer lists."""
        self._sweep_due = False
        listed = self._listed_steps()
        self._delete(
            steps_to_delete(fmt.list_steps(self.checkpointer.storage), listed, restoring=False),
            "Ray Train no longer lists it",
        )

    def _listed_steps(self) -> set[int]:
        """The ckpt steps of the pointers Ray Train keeps, once it registered every report."""
        import ray.train

        listed: set[int] = set()
        for reported in ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=self.listing_timeout_s
        ):
            step = (reported.metrics or {}).get(STEP_METRIC)
            if not isinstance(step, int) or isinstance(step, bool):
                try:
                    pointer = read_pointer(reported.checkpoint)
                except FormatError:
                    continue  # a checkpoint the job reported itself, not a pointer
                if pointer.url != self.url:
                    continue
                step = pointer.step
            listed.add(step)
        return listed

    def _delete(self, steps: list[int], why: str) -> None:
        for step in steps:
            try:
                delete_step(self.checkpointer.storage, step, detached=True)
            except (OSError, CkptError) as e:
                log.warning(
                    "could not delete ckpt step %d of %s (%s): %s; `ckpt gc` removes it later", step, self.url, why, e
                )
        if steps:
            log.info("deleted ckpt steps %s of %s: %s", steps, self.url, why)
