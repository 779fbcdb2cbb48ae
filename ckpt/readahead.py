"""Reading many small chunks of one object (a pack, a shard) with a few large reads.

A restore of a model with thousands of small arrays reads thousands of chunks that lie side by
side in a few pack files: one ranged read each is one request each to an object store (2,160
GETs for Llama-70B's shape with tiny tensors, each a round trip), and an open, a read and a
close each on a file system. :class:`ReadAhead` serves a small ranged read from a block of the
object read once (``window`` bytes on a multiple of ``window``, cut at the object's end);
the next chunks asked for are then copies out of that block. Large chunks are read directly.

Blocks are shared by the reading threads (a thread that needs a block being read waits for it)
and bounded in number; memory in flight is at most ``max_blocks x window``. Reads that are not
ranged (whole objects, documents) and every write pass through unchanged.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from concurrent.futures import Future

from .storage import Storage
from .storage.base import OnPiece
from .storage.wrapper import StorageWrapper

WINDOW = 4 << 20  # bytes read at once
SMALL = 256 << 10  # ranged reads up to this size are served from blocks
MAX_BLOCKS = 16


class ReadAhead(StorageWrapper):
    """``inner`` with small ranged reads served from shared blocks (see the module)."""

    def __init__(self, inner: Storage, *, window: int = WINDOW, small: int = SMALL, max_blocks: int = MAX_BLOCKS) -> None:
        super().__init__(inner)
        self.window = window
        self.small = small
        self.max_blocks = max_blocks
        self._lock = threading.Lock()
        self._blocks: collections.OrderedDict[tuple[str, int], tuple[int, Future]] = collections.OrderedDict()
        self._sizes: dict[str, int | None] = {}
        self._size_lock = threading.Lock()
        self.block_reads = 0  # ranged reads sent to ``inner`` for blocks
        self.served = 0  # ranged reads served from blocks

    def read_range_into(self, path: str, offset: int, buffers: Sequence[memoryview], *,
                        on_piece: OnPiece | None = None) -> None:
        total = sum(b.nbytes for b in buffers)
        if total > self.small or total == 0:
            self.inner.read_range_into(path, offset, buffers, on_piece=on_piece)
            return
        start, data = self._block(path, offset, total)
        pos = offset - start
        for i, b in enumerate(buffers):
            n = b.nbytes
            view = b.cast("B")
            view[:] = data[pos: pos + n]
            if on_piece is not None:
                on_piece(i, 0, view)
            pos += n

    def _size(self, path: str) -> int | None:
        with self._size_lock:  # one HEAD per object, not one per thread that starts on it
            if path not in self._sizes:
                self._sizes[path] = self.inner.size(path)
            return self._sizes[path]

    def _block(self, path: str, offset: int, nbytes: int) -> tuple[int, memoryview]:
        """The block of ``path`` holding ``[offset, offset + nbytes)``: found, being read by
        another thread (waited for), or read now."""
        size = self._size(path)
        if size is None:
            raise FileNotFoundError(path)
        if offset + nbytes > size:
            raise EOFError(f"{path}: {size} bytes, expected at least {offset + nbytes}")
        with self._lock:
            found = next(((start, fut) for (p, start), (length, fut) in reversed(self._blocks.items())
                          if p == path and start <= offset and offset + nbytes <= start + length), None)
            self.served += 1
            if found is not None:
                self._blocks.move_to_end((path, found[0]))
                start, fut = found
                mine = False
            else:
                # Blocks on window boundaries: threads starting anywhere in one share it. A read
                # across a boundary gets a block of its own from its offset.
                start = offset - offset % self.window
                if offset + nbytes > start + self.window:
                    start = offset
                length = min(self.window, size - start)
                fut = Future()
                fut.set_running_or_notify_cancel()
                self._blocks[(path, start)] = (length, fut)
                while len(self._blocks) > self.max_blocks:
                    self._blocks.popitem(last=False)  # a reader holding it keeps its bytes alive
                self.block_reads += 1
                mine = True
        if mine:
            try:
                buf = bytearray(length)
                self.inner.read_range_into(path, start, [memoryview(buf)])
                fut.set_result(memoryview(buf))
            except BaseException as e:  # noqa: BLE001 - every reader of the block gets it
                with self._lock:
                    self._blocks.pop((path, start), None)
                fut.set_exception(e)
        return start, fut.result()
