"""The first load of a job whose checkpoint folder has no committed step yet.

``checkpoint.initial_load_path`` may name, as with torchtitan's own manager:

- a ckpt run (any fsspec URL with committed steps): its newest step, resharded;
- a DCP checkpoint (a folder with ``.metadata``, such as a ``step-N`` folder torchtitan's DCP
  manager wrote), loaded the way that manager loads it (model keys flattened at the top);
- with ``initial_load_in_hf``, Hugging Face safetensors through the model's state-dict adapter
  (``initial_load_path``, else the adapter's ``hf_assets_path``).

``initial_load_model_only`` (torchtitan's default) loads the model alone. Nothing to load
(no path, no HF) is a fresh start.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from torchtitan.components.checkpointer.base import MODEL
from torchtitan.tools import filesystem

import ckpt
from ckpt.stateful import expand

from .hf import load_hf
from .selection import RNG, StateDictOf, check_present

log = logging.getLogger(__name__)


def load_initial(config: Any, states: dict[str, Any], sd_adapter: Any, *, load_state: dict[str, Any]) -> bool:
    """Load the initial checkpoint ``config`` names into ``states``; ``False`` on a fresh
    start. ``load_state``: the entries a full (not model-only) load takes."""
    path = config.initial_load_path
    if config.initial_load_in_hf:
        load_hf(states[MODEL], sd_adapter, path, quantized=config.initial_load_in_hf_quantized)
        return True
    if not path:
        log.info("no checkpoint in the folder and no checkpoint.initial_load_path: a fresh start")
        return False
    t0 = time.monotonic()
    model_only = config.initial_load_model_only
    if filesystem.isfile(filesystem.join(path, ".metadata")):
        _load_dcp(states, path, model_only=model_only, exclude=config.exclude_from_loading)
    else:
        storage = ckpt.open_storage(path)
        steps = ckpt.committed_steps(storage)
        if not steps:
            raise ckpt.CheckpointNotFoundError(
                f"checkpoint.initial_load_path {path}: neither a DCP checkpoint (no .metadata) nor a ckpt run with a "
                "committed step; point it at a step folder of a DCP checkpoint or at a ckpt run"
            )
        state = {MODEL: StateDictOf(states[MODEL])} if model_only else load_state
        check_present(state, ckpt.read_manifest(storage, steps[-1]))
        expanded = expand(state)
        ckpt.load(expanded.tree, storage, strict=False)
        expanded.apply()
    log.info(
        "loaded the initial checkpoint %s (%s) in %.2f s",
        path,
        "model only" if model_only else "full state",
        time.monotonic() - t0,
    )
    return True


def _load_dcp(states: dict[str, Any], path: str, *, model_only: bool, exclude: list[str]) -> None:
    """As torchtitan's DCP manager loads: the model's keys at the top level, every other entry
    (a ``Stateful`` DCP loads itself) under its name. ``rng`` is never in such a checkpoint."""
    import torch.distributed.checkpoint as dcp

    model = states[MODEL]
    if model_only:
        sd: dict[str, Any] = model.state_dict()
    else:
        sd = {k: v for k, v in states.items() if k not in (MODEL, RNG) and k not in exclude and v is not None}
        sd.update(model.state_dict())
    dcp.load(sd, checkpoint_id=path)
    model.load_state_dict(sd)
