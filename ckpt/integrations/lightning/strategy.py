"""``CkptModelParallelStrategy``: Lightning's ``ModelParallelStrategy`` (FSDP2, tensor parallel)
saving its sharded checkpoints in ckpt's format through ``ckpt.dcp.Writer``/``Reader``.

```python
strategy = CkptModelParallelStrategy(data_parallel_size=4, tensor_parallel_size=2)
trainer = L.Trainer(strategy=strategy, callbacks=[ModelCheckpoint(dirpath="s3://bucket/run")])
```

Lightning's strategy writes ``dcp.save(..., checkpoint_id=path)`` (a DCP folder) plus a
``meta.pt`` that ``torch.load`` unpickles. This one writes the whole checkpoint as one ckpt step
instead: ``dcp.save(state, storage_writer=ckpt.dcp.Writer(path, step=global_step))`` on every
rank, each writing its own shards; the values (loops, callbacks, schedulers, hyper-parameters)
are in the same step as JSON, checked before anything is written (``allow_pickle`` as in
:class:`CkptCheckpointIO`). The path is a folder holding one step, as with the
``CheckpointIO``; a path saved again gets the new step, then the older one is deleted.
Loading goes through ``dcp.load(..., storage_reader=ckpt.dcp.Reader(path, step=...))`` into
the model's and optimizers' current shards: any data/tensor-parallel layout loads any other.
A path that is a file (a full checkpoint of ``save_distributed_checkpoint=False``, or of
Lightning's ``ModelParallelStrategy``) is loaded by Lightning's own code.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

from ckpt import format as fmt
from ckpt.api import read
from ckpt.dcp import Reader, Writer
from ckpt.errors import CheckpointNotFoundError
from ckpt.retention import delete_step
from ckpt.storage import RetryPolicy, open_storage

from ._tree import MARKER, from_ckpt, to_ckpt
from .sink import remove_folder

_TENSOR_KEYS = ("state_dict", "optimizer_states")

log = logging.getLogger(__name__)


class CkptModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose sharded checkpoints are ckpt steps; see the module docstring.

    ``layout``: how the ranks' chunks are laid out (``"packs"``: a few files per rank, the
    cheapest; ``"shards"``: then consolidated into one zarr array per tensor, readable by any
    zarr v3 reader). ``allow_pickle``, ``storage_options``, ``retry``: as for ``CkptCheckpointIO``.
    """

    def __init__(
        self,
        *args: Any,
        layout: str = "packs",
        allow_pickle: bool = False,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        if not kwargs.pop("save_distributed_checkpoint", True):
            raise ValueError(
                "CkptModelParallelStrategy saves sharded checkpoints (every rank its shards); for one "
                "file gathered on rank 0 use ModelParallelStrategy(save_distributed_checkpoint=False)"
            )
        super().__init__(*args, save_distributed_checkpoint=True, **kwargs)
        self.layout = layout
        self.allow_pickle = allow_pickle
        self.storage_options = storage_options
        self.retry = retry

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "CkptModelParallelStrategy.save_checkpoint(storage_options=...) is not supported: pass "
                "storage_options=... to CkptModelParallelStrategy(...)"
            )
        import torch.distributed.checkpoint as dcp

        url = _url(self.broadcast(filepath))
        step = int(checkpoint["global_step"])
        tree = to_ckpt(checkpoint, allow_pickle=self.allow_pickle)  # every rank refuses the same value, before a byte
        writer = Writer(
            url, step=step, overwrite=True, layout=self.layout, storage_options=self.storage_options, retry=self.retry
        )
        dcp.save(tree, storage_writer=writer)
        if self.global_rank == 0:  # one path, one checkpoint: the older steps go once this one is committed
            try:
                storage = open_storage(url, storage_options=self.storage_options, retry=self.retry)
                for info in fmt.list_steps(storage):
                    if info.step != step:
                        delete_step(storage, info.step)
            except Exception as e:  # noqa: BLE001 - the new step is committed; the others wait at the barrier
                log.warning("%s: the steps before %d could not be deleted: %s", url, step, e)
        self.barrier("CkptModelParallelStrategy.save_checkpoint")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        url = _url(self.broadcast(checkpoint_path))
        if os.path.isfile(url):
            return super().load_checkpoint(Path(url), weights_only=weights_only)
        step: Any = None
        if self.global_rank == 0:
            try:
                step = _newest_step(url, self.storage_options, self.retry)
            except Exception as e:  # noqa: BLE001 - raised on every rank below, not only here
                step = e
        step = self.broadcast(step)
        if isinstance(step, BaseException):
            raise step
        assert self.model is not None and self.lightning_module is not None
        strict = self.lightning_module.strict_loading
        state = {
            "state_dict": get_model_state_dict(self.model),
            "optimizer_states": [get_optimizer_state_dict(self.model, opt) for opt in self.optimizers],
        }
        if not state["optimizer_states"]:
            del state["optimizer_states"]  # validate/test/predict: the model alone
        reader = Reader(
            url, step=step, allow_pickle=self.allow_pickle, storage_options=self.storage_options, retry=self.retry
        )
        dcp.load(state, storage_reader=reader, planner=_planner(strict))
        set_model_state_dict(self.model, state["state_dict"], options=StateDictOptions(strict=strict))
        for opt, osd in zip(self.optimizers, state.get("optimizer_states", [])):
            set_optimizer_state_dict(self.model, opt, osd)
        return _metadata(
            url, step, allow_pickle=self.allow_pickle, storage_options=self.storage_options, retry=self.retry
        )

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.global_rank == 0:
            url = _url(filepath)
            if os.path.isfile(url):
                os.remove(url)
            else:
                remove_folder(url, storage_options=self.storage_options, retry=self.retry)
        self.barrier("CkptModelParallelStrategy.remove_checkpoint")


def _planner(strict: bool) -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    return DefaultLoadPlanner(allow_partial_load=not strict)


def _newest_step(url: str, storage_options: dict[str, Any] | None, retry: RetryPolicy | None) -> int:
    steps = fmt.committed_steps(open_storage(url, storage_options=storage_options, retry=retry))
    if not steps:
        raise CheckpointNotFoundError(f"no committed checkpoint in {url}: `ckpt ls {url}` shows what is there")
    return steps[-1]


def _metadata(
    url: str, step: int, *, allow_pickle: bool, storage_options: dict[str, Any] | None, retry: RetryPolicy | None
) -> dict[str, Any]:
    """Everything of the step but the model's and optimizers' tensors (read on every rank: small)."""
    storage = open_storage(url, storage_options=storage_options, retry=retry)
    manifest = fmt.read_manifest(storage, step)
    wanted = [glob.escape(p) for p in (*manifest.arrays, *manifest.values) if p.split("/", 1)[0] not in _TENSOR_KEYS]
    tree = read(storage, step=step, include=wanted, allow_pickle=allow_pickle)
    info = tree.get(MARKER)
    if isinstance(info, dict) and isinstance(info.get("renamed"), list):  # renamed keys of what was read
        info["renamed"] = [r for r in info["renamed"] if not (r[0] and r[0][0] in _TENSOR_KEYS)]
    tree = from_ckpt(tree)
    tree["optimizer_states"] = []  # loaded into the optimizers already (Lightning only checks the key)
    return tree


def _url(path: Any) -> str:
    return os.fspath(path) if isinstance(path, os.PathLike) else str(path)
