"""Hugging Face safetensors at the edges of a run, through the model's state-dict adapter.

torchtitan's models name their parameters their own way; the adapter (``sd_adapter``) maps
them to and from the Hugging Face names. These two functions do what torchtitan's DCP manager
does with it, so that ``initial_load_in_hf`` and ``last_save_in_hf`` mean the same here.
"""

from __future__ import annotations

import logging
from typing import Any

from torchtitan.tools import filesystem

log = logging.getLogger(__name__)


def load_hf(model: Any, sd_adapter: Any, path: str | None, *, quantized: bool) -> None:
    """Load Hugging Face safetensors from ``path`` (else the adapter's ``hf_assets_path``)
    into ``model`` (torchtitan's ``ModelWrapper``)."""
    import torch.distributed.checkpoint as dcp

    if sd_adapter is None:
        raise ValueError("checkpoint.initial_load_in_hf needs the model's state-dict adapter, and this model has none")
    path = path or sd_adapter.hf_assets_path
    if not path or not filesystem.isdir(path):
        raise ValueError(
            f"checkpoint.initial_load_in_hf: no Hugging Face checkpoint at {path!r}; set "
            "checkpoint.initial_load_path or model.hf_assets_path to a folder of safetensors"
        )
    log.info("loading Hugging Face safetensors from %s", path)
    hf_state = sd_adapter.to_hf(model.state_dict())
    dcp.load(hf_state, storage_reader=sd_adapter.get_hf_storage_reader(path, quantized))
    model.load_state_dict(sd_adapter.from_hf(hf_state))


def save_hf(model_state: dict[str, Any], sd_adapter: Any, path: str) -> None:
    """Write ``model_state`` (torchtitan's names) as Hugging Face safetensors into ``path``:
    one file, or the adapter's shards and their index when it has a mapping. Every rank
    calls it (a collective, like ``dcp.save``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files_on_every_rank

    hf_state = sd_adapter.to_hf(model_state)
    mapping = sd_adapter.fqn_to_index_mapping
    sharded = filesystem.join(path, "sharded") if mapping else path
    writer = HuggingFaceStorageWriter(
        path=sharded, save_distributed=True, fqn_to_index_mapping=mapping, enable_consolidation=not mapping
    )
    dcp.save(hf_state, storage_writer=writer)
    if mapping:  # several files: every rank merges its share of them
        consolidate_safetensors_files_on_every_rank(
            input_dir=sharded, output_dir=path, fqn_to_index_mapping=mapping, num_threads=5
        )
