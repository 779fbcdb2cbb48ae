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
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from ... import format as fmt
from ...errors import FormatError
from ...storage import Storage

log = logging.getLogger(__name__)

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


class PointerKeeper:
    """Keeps ``output_dir``'s pointer folders in step with a ckpt run while a Trainer trains.

    :meth:`expect` is told each checkpoint's TrainerState when it is taken; :meth:`committed`,
    called when it is committed (from the sink's thread), writes its folder on a thread of its
    own and removes the folders of steps retention removed; :meth:`close` writes what is still
    missing for the newest committed step and tidies up once more. A folder that cannot be
    written is an error in the log, never a failed checkpoint: the step is committed, and
    ``CkptCallback.latest_checkpoint`` writes its folder again from the step.
    """

    def __init__(self, output_dir: str | os.PathLike[str], storage: Storage, weight_names: list[str]) -> None:
        self.output_dir = Path(output_dir)
        self.storage = storage
        self.weight_names = weight_names
        self._texts: dict[int, str] = {}
        self._written: set[int] = set()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="ckpt-hf-pointer")

    def expect(self, step: int, trainer_state_json: str) -> None:
        with self._lock:
            self._texts[step] = trainer_state_json

    def committed(self, step: int) -> None:
        pool = self._pool
        if pool is None:
            return
        try:
            pool.submit(self._write, step)
        except RuntimeError:  # shut down meanwhile: close() writes the newest
            pass

    def close(self, newest: int | None) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        if newest is not None:
            self._write(newest)
        try:
            prune_pointers(self.output_dir, self.storage.url, fmt.committed_steps(self.storage))
        except Exception as e:  # noqa: BLE001 - see the class docstring
            log.error("pointer folders in %s could not be pruned against %s: %s", self.output_dir, self.storage.url, e)

    def _write(self, step: int) -> None:
        with self._lock:
            if step in self._written or step not in self._texts:
                return
            try:
                write_pointer(self.output_dir, Pointer(self.storage.url, step), self._texts[step], self.weight_names)
                self._written.add(step)
                for old in [s for s in self._texts if s <= step]:
                    del self._texts[old]
                prune_pointers(self.output_dir, self.storage.url, fmt.committed_steps(self.storage))
            except Exception as e:  # noqa: BLE001 - see the class docstring
                log.error(
                    "step %d is committed in %s but its folder %s could not be written: %s; "
                    "callback.latest_checkpoint(output_dir) writes it again",
                    step,
                    self.storage.url,
                    self.output_dir / folder_name(step),
                    e,
                )
