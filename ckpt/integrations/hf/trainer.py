"""A ``transformers.TrainerCallback`` that checkpoints a ``Trainer`` with ckpt and resumes it bit-exactly.

```python
callback = CkptCallback("s3://bucket/run1")
trainer = Trainer(model, args, train_dataset=ds, callbacks=[callback])
trainer.train(resume_from_checkpoint=callback.latest_checkpoint(args.output_dir))  # None: from scratch
```

When: the Trainer's own save strategy decides (``save_strategy`` "steps"/"epoch", ``save_steps``);
its ``DefaultFlowCallback`` sets ``control.should_save`` in ``on_step_end``/``on_epoch_end``, and
this callback takes that decision over: it clears the flag (the Trainer writes no ``torch.save``
folder) and takes a ckpt snapshot of step N at the Trainer's save point, which is the moment
before the next step's first forward (``on_step_begin``, or ``on_epoch_begin`` when step N ends
an epoch, or ``on_train_end``): logging and evaluation of step N are done by then, exactly as
when the Trainer saves. ``save`` returns at once; the parameters and the optimizer state are
copied to host memory while that forward and backward run, and ``on_pre_optimizer_step`` (like
the optimizer's pre-step hook) waits for the copy. ``save_total_limit`` becomes ``keep_last``.

What: the model, the optimizer (keyed by parameter name), the LR scheduler, Accelerate's grad
scaler, every random generator, and the TrainerState as JSON. Once step N is committed, rank 0
writes the pointer folder ``output_dir/checkpoint-N`` (see :mod:`.pointer`) and removes those
whose step retention removed.

Resume: the Trainer reads ``trainer_state.json`` of the pointer folder, skips the batches it has
trained (its sampler is seeded per epoch, so the order is the same), and loads no tensor. In
``on_train_begin`` this callback restores model, optimizer, scheduler and scaler from ckpt step
N, and sets the random generators where the uninterrupted run read them: in ``on_epoch_begin``
for a snapshot taken there (before the data loader's iterator draws its seed), otherwise in the
first ``on_step_begin`` (after the Trainer skipped the batches, before the first forward).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import SaveStrategy

from ... import format as fmt
from ...api import read
from ...checkpointer import Checkpointer
from ...config import CheckpointerConfig
from ...errors import CheckpointExistsError, CheckpointNotFoundError, CkptError, FormatError
from ...handles import SnapshotHandle
from ...stateful import OptimizerState
from ...storage import open_storage
from .common import DeferredRNG, grad_scaler, torch_optimizer
from .pointer import Pointer, PointerKeeper, folder_name, read_pointer, write_pointer

log = logging.getLogger(__name__)

# The key of the pointer inside trainer_state.json's ``stateful_callbacks``: how a resumed
# Trainer's state says that it came from a pointer folder, and from which step of which run.
MARKER = "ckpt"
SaveAt = Literal["epoch_begin", "step_begin", "train_end"]


class CkptCallback(TrainerCallback):
    """Checkpoints of a ``Trainer`` in a ckpt run at ``url``; see the module docstring.

    ``keep_last``: how many checkpoints retention keeps; by default the Trainer's
    ``save_total_limit`` (unset: all). ``write_pointers``: write ``checkpoint-N`` pointer folders
    into ``args.output_dir`` (needed by ``resume_from_checkpoint=True``; :meth:`latest_checkpoint`
    writes the one it returns either way). Other keyword arguments go to :class:`ckpt.Checkpointer`
    (``keep_every``, ``agent``, ``storage_options``, ``host_budget_bytes``, ``on_error``, ...).
    """

    def __init__(
        self,
        url: Any,
        *,
        keep_last: int | None | Literal["save_total_limit"] = "save_total_limit",
        write_pointers: bool = True,
        **checkpointer_options: Any,
    ) -> None:
        if "every_n_steps" in checkpointer_options:
            raise ValueError(
                "CkptCallback: every_n_steps is not an option here; the Trainer's save_strategy and "
                "save_steps decide when a checkpoint is taken"
            )
        # A bad option fails here, not at the first checkpoint.
        CheckpointerConfig(
            url=url, keep_last=3 if keep_last == "save_total_limit" else keep_last, **checkpointer_options
        )
        self.url = url
        self.keep_last = keep_last
        self.write_pointers = write_pointers
        self.options = checkpointer_options
        self.checkpointer: Checkpointer | None = None
        self._state: dict[str, Any] = {}
        self._rng = DeferredRNG()
        self._rng_at: str | None = None
        self._due: int | None = None
        self._latest: SnapshotHandle | None = None
        self._prepared = False
        self._weight_names: list[str] = []
        self._pointers: PointerKeeper | None = None

    # -- resuming ---------------------------------------------------------------------------

    def latest_checkpoint(self, output_dir: str) -> str | None:
        """The ``checkpoint-N`` folder to pass to ``Trainer.train(resume_from_checkpoint=...)``
        for the newest committed step of the ckpt run, or None when it has none (start from
        scratch). The folder is written from the ckpt step when ``output_dir`` lacks it (a new
        machine, a lost local disk): ckpt is the source of truth. Call it on every process."""
        storage = open_storage(
            self.url, storage_options=self.options.get("storage_options"), retry=self.options.get("retry")
        )
        steps = fmt.committed_steps(storage)
        if not steps:
            return None
        step = steps[-1]
        folder = Path(output_dir) / folder_name(step)
        pointer = Pointer(storage.url, step)
        if folder.is_dir() and read_pointer(folder) == pointer:
            return str(folder)
        try:
            saved = read(storage, step=step, include="trainer")["trainer"]
        except CheckpointNotFoundError:
            saved = {}
        if not isinstance(saved, dict) or "state" not in saved:
            raise FormatError(
                f"step {step} of {storage.url} was not written by CkptCallback (it has no trainer state): "
                "restore it with ckpt.Checkpointer.restore, or give CkptCallback a new url"
            )
        write_pointer(output_dir, pointer, saved["state"], saved.get("weights", []))
        log.info("wrote %s for step %d of %s", folder, step, storage.url)
        return str(folder)

    # -- events -----------------------------------------------------------------------------

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        _check_args(args)

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        *,
        model: Any = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        _check_args(args)
        if model is None or optimizer is None or lr_scheduler is None:
            raise CkptError("CkptCallback needs the Trainer's model, optimizer and lr_scheduler in on_train_begin")
        self.close()  # a previous train() of the same callback
        keep_last = self.keep_last
        if keep_last == "save_total_limit":
            keep_last = args.save_total_limit if args.save_total_limit and args.save_total_limit > 0 else None
        self.checkpointer = ckptr = Checkpointer(self.url, keep_last=keep_last, **self.options)
        inner = torch_optimizer(optimizer)
        self._rng = DeferredRNG()
        self._rng_at = None
        self._due = None
        self._latest = None
        self._prepared = False
        self._weight_names = list(model.state_dict().keys())
        self._state = {
            "model": model,
            "optim": OptimizerState(model, inner),
            "sched": lr_scheduler,
            "rng": self._rng,
            "trainer": {"state": "", "rng_at": "", "weights": self._weight_names},
        }
        scaler = grad_scaler(optimizer)
        if scaler is not None:
            self._state["scaler"] = scaler
        ckptr.attach(inner)
        self._pointers = (
            PointerKeeper(args.output_dir, ckptr.storage, self._weight_names)
            if self.write_pointers and args.should_save
            else None
        )
        marker = (state.stateful_callbacks or {}).get(MARKER)
        try:
            self._resume(ckptr, marker, state)
        except BaseException:
            self.close()  # no threads left behind by a refused start
            raise

    def _resume(self, ckptr: Checkpointer, marker: Any, state: TrainerState) -> None:
        if state.global_step == 0:
            steps = ckptr.group.broadcast(fmt.committed_steps(ckptr.storage) if ckptr.group.rank == 0 else None)
            if steps:
                raise CheckpointExistsError(
                    f"the ckpt run {ckptr.storage.url} already has committed steps (newest {steps[-1]}) and this "
                    "Trainer starts from step 0: resume with trainer.train(resume_from_checkpoint="
                    "callback.latest_checkpoint(args.output_dir)), or give CkptCallback a new url"
                )
        elif marker is None:
            log.warning(
                "the Trainer resumed at step %d from a checkpoint folder it wrote itself; ckpt restores "
                "nothing and checkpoints from here on",
                state.global_step,
            )
        else:
            self._restore(Pointer.from_dict(marker, f"trainer_state.json of step {state.global_step}"), state)

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._take_due(state, "epoch_begin")
        if self._rng_at == "epoch_begin":
            self._rng.apply()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._take_due(state, "step_begin")
        self._rng.apply()  # a resumed run's first step: after the skipped batches, before the forward

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        handle = self._latest
        if handle is not None and not handle.staged.done():
            try:
                handle.staged.result()
            except BaseException as e:  # noqa: BLE001 - the Checkpointer reports it (on_error)
                log.debug("checkpoint of step %d failed while staging: %s", handle.step, e)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._claim_save(state, control)
        if not self._prepared and self.checkpointer is not None:
            self._prepared = True  # the optimizer has its state now: plan the first checkpoint off the loop
            self.checkpointer.prepare(self._state)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._claim_save(state, control)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._take_due(state, "train_end")
        self.close()

    def close(self) -> None:
        """Wait until every checkpoint taken is committed (or failed), write their pointer
        folders, stop the threads. ``on_train_end`` calls it; call it yourself when ``train()``
        ended in an exception and the process lives on."""
        ckptr, self.checkpointer = self.checkpointer, None
        if ckptr is None:
            return
        try:
            ckptr.close(wait=True)
        finally:
            pointers, self._pointers = self._pointers, None
            if pointers is not None:
                pointers.close(ckptr.status().last_committed)

    # -- internals --------------------------------------------------------------------------

    def _claim_save(self, state: TrainerState, control: TrainerControl) -> None:
        if control.should_save:
            control.should_save = False  # ckpt takes this checkpoint; the Trainer writes none
            self._due = state.global_step

    def _take_due(self, state: TrainerState, where: SaveAt) -> None:
        step, self._due = self._due, None
        if step is None or self.checkpointer is None:
            return
        if step != state.global_step:
            raise CkptError(f"a checkpoint of step {step} was due and the Trainer is at step {state.global_step}")
        self._state["trainer"] = {
            "state": self._trainer_state_json(state, step),
            "rng_at": where,
            "weights": self._weight_names,
        }
        handle = self.checkpointer.save(step, self._state, force=True)
        if handle is None:
            return
        self._latest = handle
        pointers = self._pointers
        if pointers is not None:
            pointers.expect(step, self._state["trainer"]["state"])

            def committed(fut: Future) -> None:
                if fut.exception() is None:
                    pointers.committed(step)

            handle.committed.add_done_callback(committed)

    def _trainer_state_json(self, state: TrainerState, step: int) -> str:
        doc = dataclasses.asdict(state)
        assert self.checkpointer is not None
        doc["stateful_callbacks"] = {
            **(doc.get("stateful_callbacks") or {}),
            MARKER: Pointer(self.checkpointer.storage.url, step).to_dict(),
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    def _restore(self, pointer: Pointer, state: TrainerState) -> None:
        ckptr = self.checkpointer
        assert ckptr is not None
        if pointer.step != state.global_step:
            raise FormatError(
                f"trainer_state.json of step {state.global_step} points to ckpt step {pointer.step}; "
                "the folder was altered: resume with callback.latest_checkpoint(output_dir)"
            )
        if pointer.url != ckptr.storage.url:
            raise CkptError(
                f"checkpoint-{pointer.step} points to the ckpt run {pointer.url} and this CkptCallback "
                f"writes to {ckptr.storage.url}: give the callback that url (or edit ckpt.json of the "
                "folder if the run moved)"
            )
        try:
            ckptr.restore(self._state, step=pointer.step)
        except CheckpointNotFoundError as e:
            raise CheckpointNotFoundError(
                f"checkpoint-{pointer.step} points to step {pointer.step} of {pointer.url}, "
                f"which is not committed there (removed by retention?): {e}"
            ) from None
        self._rng_at = self._state["trainer"]["rng_at"]
        self._prepared = True  # restore() prepares the first checkpoint
        log.info(
            "restored step %d from %s (model, optimizer, scheduler; RNG at the first %s)",
            pointer.step,
            pointer.url,
            "epoch" if self._rng_at == "epoch_begin" else "step",
        )


def _check_args(args: TrainingArguments) -> None:
    """Refuse what a pointer folder cannot serve, before anything is trained."""
    if args.save_strategy == SaveStrategy.BEST:
        raise ValueError(
            "CkptCallback does not support save_strategy='best' (the Trainer decides it after its "
            "evaluation, past the last callback): use save_strategy='steps' with keep_last, and "
            "ckpt export --format hf for the step you keep"
        )
    if args.load_best_model_at_end:
        raise ValueError(
            "CkptCallback does not support load_best_model_at_end=True: the Trainer would load the best "
            "checkpoint-N folder itself, and a pointer folder holds no weights; restore the best step "
            "with ckpt.Checkpointer.restore(state, step=N) or export it with ckpt export --format hf"
        )
    if args.deepspeed:
        raise ValueError("CkptCallback does not support DeepSpeed (its engine saves and loads its own checkpoints)")
