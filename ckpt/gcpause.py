"""The cycle collector paused while a restore or a save builds its documents and plans.

Reading a commit point and a fragment of 2,000 arrays makes some 100,000 small objects (dicts,
lists, ints); each burst of them triggers collections, and a full one walks the whole heap of a
training process (torch, the model, the optimizer state): on a 2,200-array restore from memory
this cost a quarter of the time. Nothing a restore builds is cyclic garbage, so the collector is
paused for it and left as it was found (enabled or not) afterwards.

A save pauses it only while it builds documents (a fragment, the coverage of a commit, a commit
point), never across its I/O: persisting every step runs back to back, and a pause held over
it would starve the collector of the training process for good. A full collection triggered by
a background thread holds the GIL for the whole walk (about 150 ms with torch loaded), and the
training thread waits for it.
"""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


_lock = threading.Lock()
_depth = 0  # pauses in progress, in any thread
_was_enabled = False  # as the first of them found it


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pauses nest and overlap across threads (a restore, the first checkpoint's preparation in
    the background): the collector comes back, as found, when the last of them ends."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()


def without_gc(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run with the cycle collector paused."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with gc_paused():
            return fn(*args, **kwargs)

    return wrapper
