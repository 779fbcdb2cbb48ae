"""``checkpoint-N`` pointer folders: what ``Trainer.train(resume_from_checkpoint=...)`` reads,
with the weights, optimizer, scheduler and RNG left in the ckpt run.

The Trainer resumes from a folder: it reads ``trainer_state.json`` (global step, epoch, logs,
from which it skips the batches already trained) and loads the model weights through a
safetensors index. A pointer folder holds, written only once ckpt step N is committed::

    checkpoint-N/
        trainer_state.json             the TrainerState at the save point (as the Trainer writes it)
        ckpt.json                      {"format": "ckpt-pointer", "version": 1, "url": ..., "step": N}
        model.safetensors.index.json   every weight of the model -> ckpt-pointer.safetensors
        ckpt-pointer.safetensors       a safetensors file with no tensors

The Trainer's loader thus reads no tensor (no missing key either, so it warns of nothing);
:class:`~ckpt.integrations.hf.CkptCallback` restores everything from ckpt step N in
``on_train_begin``. The folder is no model folder (no ``config.json``, no tensor):
``from_pretrained`` fails on it; ``ckpt export`` with ``--format hf`` gives one.

A folder is written under a temporary name and renamed, so a reader sees it whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from ...errors import FormatError

POINTER_NAME = "ckpt.json"
POINTER_FORMAT = "ckpt-pointer"
POINTER_VERSION = 1
TRAINER_STATE_NAME = "trainer_state.json"
INDEX_NAME = "model.safetensors.index.json"
EMPTY_SHARD_NAME = "ckpt-pointer.safetensors"
PREFIX = "checkpoint-"


@dataclass(frozen=True, slots=True)
class Pointer:
    """Where the state of a ``checkpoint-N`` folder lives: ckpt ``step`` of the run at ``url``."""

    url: str
    step: int

    def to_dict(self) -> dict[str, object]:
        return {"format": POINTER_FORMAT, "version": POINTER_VERSION, "url": self.url, "step": self.step}

    @classmethod
    def from_dict(cls, d: object, where: str) -> Pointer:
        if not isinstance(d, dict) or d.get("format") != POINTER_FORMAT:
            raise FormatError(f"{where} is not a ckpt pointer (no format {POINTER_FORMAT!r})")
        if d.get("version") != POINTER_VERSION:
            raise FormatError(
                f"{where}: ckpt pointer version {d.get('version')!r} is not {POINTER_VERSION}; upgrade ckpt to read it"
            )
        url, step = d.get("url"), d.get("step")
        if not isinstance(url, str) or isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise FormatError(f"{where}: a ckpt pointer needs a url (str) and a step (int >= 0), got {d!r}")
        return cls(url, step)


def folder_name(step: int) -> str:
    return f"{PREFIX}{step}"


def write_pointer(
    output_dir: str | os.PathLike[str], pointer: Pointer, trainer_state_json: str, weight_names: Iterable[str]
) -> Path:
    """Write ``output_dir/checkpoint-N`` for ``pointer`` (atomically: temporary name, rename);
    a folder of that name pointing elsewhere (or written by the Trainer) is replaced, one with
    the same pointer is kept. Returns its path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / folder_name(pointer.step)
    tmp = out / f".{folder_name(pointer.step)}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        (tmp / TRAINER_STATE_NAME).write_text(trainer_state_json)
        (tmp / POINTER_NAME).write_text(json.dumps(pointer.to_dict(), indent=2) + "\n")
        meta = {"format": "pt", "ckpt_url": pointer.url, "ckpt_step": str(pointer.step)}
        save_file({}, str(tmp / EMPTY_SHARD_NAME), metadata=meta)
        index = {"metadata": {"total_size": 0, **meta}, "weight_map": {k: EMPTY_SHARD_NAME for k in weight_names}}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if final.exists():
            if _same(final, pointer):  # written already (by another process resuming from it, say)
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process (every rank may write the folder it resumes from) was first.
            if not _same(final, pointer):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _same(folder: Path, pointer: Pointer) -> bool:
    try:
        return read_pointer(folder) == pointer and (folder / TRAINER_STATE_NAME).is_file()
    except FormatError:
        return False


def read_pointer(folder: str | os.PathLike[str]) -> Pointer | None:
    """The pointer of a ``checkpoint-N`` folder, or None for a folder the Trainer wrote itself."""
    path = Path(folder) / POINTER_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path} is not JSON ({e}); remove the folder or write it again") from None
    return Pointer.from_dict(doc, str(path))


def pointer_folders(output_dir: str | os.PathLike[str]) -> dict[int, Path]:
    """The pointer folders in ``output_dir`` by step (folders the Trainer wrote itself left out)."""
    out: dict[int, Path] = {}
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        if p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit() and (p / POINTER_NAME).is_file():
            out[int(p.name[len(PREFIX) :])] = p
    return out


def prune_pointers(output_dir: str | os.PathLike[str], url: str, keep: Iterable[int]) -> list[int]:
    """Remove the pointer folders into the run at ``url`` whose step is not in ``keep`` (the
    steps the run still has); returns the steps removed. Folders pointing elsewhere stay."""
    keep = set(keep)
    removed = []
    for step, path in sorted(pointer_folders(output_dir).items()):
        if step in keep:
            continue
        try:
            pointer = read_pointer(path)
        except FormatError:
            continue
        if pointer is not None and pointer.url == url:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(step)
    return removed
