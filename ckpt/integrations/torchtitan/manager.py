"""The checkpoint manager: torchtitan's four verbs on one :class:`ckpt.Checkpointer`.

The flow, as the torchtitan trainer drives it:

- ``load(step)`` before the loop: the newest committed step of ``folder`` (or ``step``),
  resharded into this job's layout; with none there, ``initial_load_path`` (a ckpt run, a DCP
  checkpoint or, with ``initial_load_in_hf``, Hugging Face safetensors); else a fresh start.
- ``save(step, last_step)`` after every step: on checkpoint steps (every ``interval``, the first
  step with ``enable_first_step_checkpoint``, the last one) it hands the state to the
  Checkpointer, which takes references to the tensors and returns; the copy to host memory runs
  in the background while the next forward and backward run.
- ``maybe_wait_for_staging()`` before ``optimizers.step()``: waits until that copy is done,
  the one place training may wait. (The inner optimizers are attached too, so a step taken
  without the call waits as well.)
- ``close()`` at teardown: every checkpoint taken is committed (or its failure reported).

The state is torchtitan's: ``model`` (the flattened state dict of every model part),
``optimizer`` (the FQN-keyed flat optimizer state), ``lr_scheduler``, ``dataloader``,
``train_state`` and whatever else the trainer passes in ``states``, plus ``rng`` (each rank's
random generators) unless ``save_rng=False``. Each is stored under its own name, so the
checkpoint reads as ``model/<fqn>``, ``optimizer/state.<fqn>.exp_avg``, ...
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torchtitan.components.checkpointer.base import (
    DATALOADER,
    LR_SCHEDULER,
    MODEL,
    OPTIMIZER,
    BaseCheckpointManager,
    ModelWrapper,
)
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.tools import filesystem

import ckpt
from ckpt.stateful import expand

from .hf import save_hf
from .initial import load_initial
from .selection import RNG, StateDictOf, check_present, export_model, model_only_checkpoint, saved_entries

if TYPE_CHECKING:
    from torch import nn

    from ckpt.handles import SnapshotHandle

log = logging.getLogger(__name__)


class CkptCheckpointManager(BaseCheckpointManager):
    """torchtitan checkpoint manager on ckpt: lazy snapshots in a reshardable format."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseCheckpointManager.Config):
        """torchtitan's checkpoint policy fields, and ckpt's own.

        ``folder`` may be any fsspec URL (``s3://bucket/run1``) or a path relative to the
        trainer's dump folder. ``keep_latest_k`` (0: keep all) is the number of newest
        committed checkpoints kept; a checkpoint being written never counts, so none is ever
        deleted for one that may still fail.
        """

        agent: str | None = None
        """Node agent address (``unix:///run/ckpt/agent.sock``): it takes the snapshots,
        persists, replicates and commits them; ``None`` writes from this process."""

        keep_every: int = 0
        """Also keep for good every checkpoint whose step is a multiple of this (0: none)."""

        host_budget_bytes: int | None = None
        """Host memory for snapshots, reused across checkpoints (None: twice one snapshot)."""

        when_busy: Literal["block", "skip"] = "block"
        """When the host budget is taken by checkpoints still being written: wait, or skip."""

        on_error: Literal["warn", "raise"] = "warn"
        """A failed checkpoint is logged and training goes on ("warn"), or it raises at the
        next save / wait / close ("raise")."""

        save_rng: bool = True
        """Save each rank's random generators as ``rng``, so a resumed run draws the same
        random numbers as one that never stopped."""

        def __post_init__(self) -> None:
            BaseCheckpointManager.Config.__post_init__(self)
            if self.agent is not None and (not isinstance(self.agent, str) or "://" not in self.agent):
                raise ValueError(
                    f"checkpoint.agent must be an address like 'unix:///run/ckpt/agent.sock' or "
                    f"None, got {self.agent!r}"
                )
            if isinstance(self.keep_every, bool) or not isinstance(self.keep_every, int) or self.keep_every < 0:
                raise ValueError(f"checkpoint.keep_every must be an integer >= 0 (0: none), got {self.keep_every!r}")
            if self.keep_every and self.keep_every % self.interval:
                log.warning(
                    "checkpoint.keep_every=%d is not a multiple of checkpoint.interval=%d: only the steps that are both "
                    "checkpoints and multiples of %d are kept for good",
                    self.keep_every,
                    self.interval,
                    self.keep_every,
                )
            if self.host_budget_bytes is not None and self.host_budget_bytes < 1:
                raise ValueError(f"checkpoint.host_budget_bytes must be >= 1 or None, got {self.host_budget_bytes!r}")
            if self.when_busy not in ("block", "skip"):
                raise ValueError(f"checkpoint.when_busy must be 'block' or 'skip', got {self.when_busy!r}")
            if self.on_error not in ("warn", "raise"):
                raise ValueError(f"checkpoint.on_error must be 'warn' or 'raise', got {self.on_error!r}")

    def __init__(
        self,
        config: Config,
        *,
        dataloader: Any,
        model_parts: list[nn.Module],
        optimizers: Any,
        lr_schedulers: Any,
        states: dict[str, Any],
        sd_adapter: Any,
        base_folder: str = "",
    ) -> None:
        self.save_future = None
        self.enable = config.enable
        if not self.enable:
            return
        self.config = config
        self.folder = filesystem.join(base_folder, config.folder)
        self.interval = config.interval
        self.states = states
        self.states.update(
            {
                MODEL: ModelWrapper(model_parts),
                OPTIMIZER: optimizers,
                DATALOADER: dataloader,
                LR_SCHEDULER: lr_schedulers,
            }
        )
        if config.save_rng:
            self.states.setdefault(RNG, ckpt.RNGState())
        self.sd_adapter = sd_adapter
        if config.last_save_in_hf and sd_adapter is None:
            raise ValueError("checkpoint.last_save_in_hf needs the model's state-dict adapter, and this model has none")
        self.export_dtype = TORCH_DTYPE_MAP[config.export_dtype]
        self.checkpointer = ckpt.Checkpointer(
            self.folder,
            every_n_steps=1,  # which steps are checkpoints is decided here (_should_save)
            keep_last=config.keep_latest_k or None,
            keep_every=config.keep_every or None,
            agent=config.agent,
            host_budget_bytes=config.host_budget_bytes,
            when_busy=config.when_busy,
            on_error=config.on_error,
        )
        # The inner optimizers own the parameters and their state: their tensors are copied
        # lazily, and their step waits for that copy.
        for optimizer in _torch_optimizers(optimizers):
            self.checkpointer.attach(optimizer)
        self._handle: SnapshotHandle | None = None
        log.info(
            "checkpointing with ckpt into %s (every %d steps, keep_latest_k=%d, keep_every=%d%s)",
            self.checkpointer.storage.url,
            self.interval,
            config.keep_latest_k,
            config.keep_every,
            f", node agent {config.agent}" if config.agent else "",
        )

    def __del__(self) -> None:
        # Not close(): at interpreter exit the writer threads are gone and waiting for the
        # checkpoints in flight would never end. The trainer calls close(), which waits.
        if getattr(self, "enable", False) and hasattr(self, "checkpointer"):
            self.checkpointer.close(wait=False)

    # -- save ---------------------------------------------------------------------------------

    def _should_save(self, curr_step: int, last_step: bool) -> bool:
        if self.config.load_only:
            return False
        if curr_step == 1 and self.config.enable_first_step_checkpoint:
            return True
        return last_step or curr_step % self.interval == 0

    @torch.no_grad()
    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if not self._should_save(curr_step, last_step):
            return False
        if last_step and self.config.last_save_in_hf:
            return self._save_last_in_hf(curr_step)
        if last_step and self.config.last_save_model_only:
            log.info("saving a model-only checkpoint in %s at the last step, step %d", self.export_dtype, curr_step)
            state: dict[str, Any] = {MODEL: export_model(self.states[MODEL].state_dict(), self.export_dtype)}
        else:
            state = saved_entries(self.states)
        handle = self.checkpointer.save(curr_step, state, force=True)
        self._handle = handle
        self.save_future = handle.committed if handle is not None and not handle.skipped else None
        if last_step:
            # The job ends here: the last checkpoint is durable before training returns.
            t0 = time.monotonic()
            self._wait_for_saving()
            log.info("last checkpoint, step %d, committed in %.2f s", curr_step, time.monotonic() - t0)
        return handle is not None and not handle.skipped

    def _save_last_in_hf(self, step: int) -> bool:
        """The last step as Hugging Face safetensors (the model in ``export_dtype``, HF names),
        in ``<folder>/hf/step-<step>``: beside the run's steps, never taken for one, never
        removed by retention. Written synchronously, after the checkpoints in flight."""
        self._wait_for_saving()
        path = filesystem.join(self.folder, f"hf/step-{step}")
        t0 = time.monotonic()
        save_hf(export_model(self.states[MODEL].state_dict(), self.export_dtype), self.sd_adapter, path)
        log.info(
            "saved the last step, step %d, as Hugging Face safetensors in %s in %.2f s",
            step,
            path,
            time.monotonic() - t0,
        )
        return True

    def _maybe_wait_for_staging(self) -> None:
        handle = self._handle
        if handle is not None and not handle.staged.done():
            wait_futures([handle.staged])  # a staging failure is reported per on_error, not here

    def _wait_for_saving(self) -> None:
        self.checkpointer.wait()
        self.save_future = None

    def _close(self) -> None:
        if hasattr(self, "checkpointer"):  # __del__ of a manager whose __init__ raised
            self.checkpointer.close()

    # -- load ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _load(self, step: int = -1) -> bool:
        ckptr = self.checkpointer
        if step == -1:
            steps = ckpt.committed_steps(ckptr.storage) if ckptr.group.rank == 0 else None
            chosen = ckptr.group.broadcast(steps[-1] if steps else None)
        else:
            chosen = step
        if chosen is None:
            return load_initial(self.config, self.states, self.sd_adapter, load_state=self._selected(model_only=False))
        t0 = time.monotonic()
        manifest = ckpt.read_manifest(ckptr.storage, int(chosen))
        if chosen == 0 or model_only_checkpoint(manifest):
            self._load_model_only(int(chosen), manifest)
        else:
            state = self._selected(model_only=False)
            check_present(state, manifest)
            ckptr.restore(state, step=int(chosen), strict=False)  # what the checkpoint has beyond state: not asked for
        log.info("loaded step %d from %s in %.2f s", chosen, ckptr.storage.url, time.monotonic() - t0)
        return True

    def _load_model_only(self, step: int, manifest: ckpt.Manifest) -> None:
        """A seed or last-step checkpoint: the model alone, saved perhaps in ``export_dtype``
        and then converted to the model's dtypes (as DCP does), from storage."""
        dtypes = sorted({spec.dtype for spec in manifest.arrays.values()})
        log.info(
            "step %d holds the model only (a seed or last-step checkpoint, dtypes %s): loading the model", step, dtypes
        )
        state = self._selected(model_only=True)
        check_present(state, manifest)
        expanded = expand(state)
        ckpt.load(expanded.tree, self.checkpointer.storage, step=step, strict=False, allow_cast=True)
        expanded.apply()

    def _selected(self, model_only: bool) -> dict[str, Any]:
        """The entries to load: the model alone, or every entry but ``exclude_from_loading``."""
        if model_only:
            return {MODEL: StateDictOf(self.states[MODEL])}
        unknown = [k for k in self.config.exclude_from_loading if k not in self.states]
        if unknown:
            raise ValueError(
                f"checkpoint.exclude_from_loading names {unknown}, which are not in the state "
                f"(its entries: {sorted(self.states)})"
            )
        kept = {k: v for k, v in self.states.items() if k not in self.config.exclude_from_loading}
        return saved_entries(kept, loading=True)


def _torch_optimizers(optimizers: Any) -> list[torch.optim.Optimizer]:
    """The optimizers that own tensors: the members of torchtitan's ``OptimizersContainer``
    (an ``Optimizer`` itself, whose own ``state`` stays empty), or a plain optimizer."""
    members = getattr(optimizers, "optimizers", None)
    if members is None:
        members = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else []
    return [o for o in members if isinstance(o, torch.optim.Optimizer)]
