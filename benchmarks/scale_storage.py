"""The storage side of ``bench_scale.py``: a layer that counts every storage call by kind and
the bytes moved (:class:`Counting`), and simulated FSDP-like writers whose fragments are made on
read byte for byte as a writer writes them (:class:`SimulatedWriters`), so that nothing of N x T
is kept in memory."""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Sequence
from typing import Any

import crc32c

from ckpt import format as fmt
from ckpt.layouts import pack_name
from ckpt.manifest import FORMAT_NAME, FORMAT_VERSION, writer_name
from ckpt.storage.wrapper import StorageWrapper

ROWS, COLS, ITEM = 1024, 8, 4  # each writer's chunk of each array: 1,024 x 8 float32
STEP, SAVE = 7, "bench-7"


class Counting(StorageWrapper):
    """Counts every storage call by kind, and the bytes read and written."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.ops: collections.Counter[str] = collections.Counter()
        self.nbytes: collections.Counter[str] = collections.Counter()
        self.put_sizes: dict[str, int] = {}

    def snapshot(self) -> dict[str, int]:
        return dict(self.ops)

    def write(self, path: str, parts: Iterable[Any], *, durable: bool = True) -> None:
        parts = [bytes(p) for p in parts]
        self.ops["PUT"] += 1
        self.put_sizes[path] = sum(len(p) for p in parts)
        self.nbytes["PUT"] += self.put_sizes[path]
        super().write(path, parts, durable=durable)

    def write_atomic(self, path: str, data: bytes) -> None:
        self.ops["PUT"] += 1
        self.put_sizes[path] = len(data)
        self.nbytes["PUT"] += len(data)
        super().write_atomic(path, data)

    def read(self, path: str) -> bytes:
        self.ops["GET"] += 1
        data = super().read(path)
        self.nbytes["GET"] += len(data)
        return data

    def read_into(self, path: str, buffers: Sequence[memoryview], *, on_piece: Any = None) -> int:
        self.ops["GET"] += 1
        return super().read_into(path, buffers, on_piece=on_piece)

    def read_range_into(self, path: str, offset: int, buffers: Sequence[memoryview], *, on_piece: Any = None) -> None:
        self.ops["GET"] += 1
        super().read_range_into(path, offset, buffers, on_piece=on_piece)

    def size(self, path: str) -> int | None:
        self.ops["HEAD"] += 1
        return super().size(path)

    def exists(self, path: str) -> bool:
        self.ops["HEAD"] += 1
        return super().exists(path)

    def list_dir(self, path: str) -> list[str]:
        self.ops["LIST"] += 1
        return super().list_dir(path)

    def walk(self, path: str) -> dict[str, int]:
        self.ops["LIST"] += 1
        return super().walk(path)

    def walk_times(self, path: str) -> dict[str, tuple[int, float | None]]:
        self.ops["LIST"] += 1
        return super().walk_times(path)

    def delete(self, path: str, *, recursive: bool = False) -> None:
        self.ops["DELETE"] += 1
        super().delete(path, recursive=recursive)


class SimulatedWriters(StorageWrapper):
    """What N writers of one save left in storage: their fragments (generated, sealed, on
    read) and their packs (sizes only). Everything else goes to ``inner``."""

    def __init__(self, inner: Any, writers: int, arrays: int) -> None:
        super().__init__(inner)
        self.n, self.t = writers, arrays
        self.writers = [writer_name(r) for r in range(writers)]
        self.index = {w: r for r, w in enumerate(self.writers)}
        self.frag_dir = f"{fmt.step_dir(STEP)}/{fmt.FRAGMENTS}"
        self.pack_dir = f"{fmt.step_dir(STEP)}/{fmt.PACKS}"
        self.paths = [f"model/layers.{t // 9}.w{t % 9}" if t < arrays - 2 else f"model/extra{t}" for t in range(arrays)]
        shape, chunk = [writers * ROWS, COLS], [ROWS, COLS]
        self.array_docs = [{"path": p, "shape": shape, "dtype": "float32", "chunk_shape": chunk,
                            "layout": {}, "chunk_separator": "."} for p in self.paths]
        self.pack_size = arrays * (ROWS * COLS * ITEM + 4)
        self.generate_s = 0.0  # time spent making fragments: not the coordinator's
        self._tpl: bytes | None = None

    MARK = "INDEX_COLUMN"  # the chunk rows of the template, replaced per writer

    def _template(self) -> bytes:
        nb = ROWS * COLS * ITEM + 4
        t = len(self.paths)
        doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step": STEP, "save_id": SAVE,
               "writer": "WRITER", "created_at": 0.0, "arrays": self.array_docs, "values": {"step": STEP},
               "chunk_table": {"array": list(range(t)), "index": self.MARK, "nbytes": [nb] * t, "crc32c": [0] * t,
                               "pack": [0] * t, "offset": [i * nb for i in range(t)]},
               "packs": ["WRITER.0"]}
        return fmt.dumps(doc)

    def fragment(self, r: int) -> bytes:
        """Writer ``r``'s fragment as ckpt writes it (sealed: the checksum of the rest, last)."""
        t0 = time.perf_counter()
        if self._tpl is None:
            self._tpl = self._template()
        w = self.writers[r]
        # An FSDP writer r holds chunk row r of every array (grid [N, 1]: linear index r)
        rows = b"[" + b",".join([b"%d" % r] * len(self.paths)) + b"]"
        body = self._tpl.replace(b"WRITER", w.encode()).replace(b'"%s"' % self.MARK.encode(), rows)
        data = body[:-1] + b',"%s":%d}' % (fmt.SEAL_KEY.encode(), crc32c.crc32c(body))
        self.generate_s += time.perf_counter() - t0
        return data

    def read(self, path: str) -> bytes:
        if path.startswith(self.frag_dir + "/") and path.endswith(".json"):
            w = path[len(self.frag_dir) + 1:-5]
            if w in self.index:
                return self.fragment(self.index[w])
        return super().read(path)

    def list_dir(self, path: str) -> list[str]:
        if path == self.frag_dir:
            return [f"{w}.json" for w in self.writers]
        return super().list_dir(path)

    def walk(self, path: str) -> dict[str, int]:
        if path == self.pack_dir:
            return {pack_name(w, 0): self.pack_size for w in self.writers}
        return super().walk(path)

    def size(self, path: str) -> int | None:
        if path.startswith(self.pack_dir + "/"):
            return self.pack_size
        return super().size(path)
