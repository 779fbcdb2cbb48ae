"""The committing agent of a job that commits itself, told that a save's fragments are in.

In a plain ``ckpt.Checkpointer(agent=...)`` job the committer's node agent commits, and used to
look for every other writer's fragment in storage in rounds (0.05 s doubling to 1 s, a GET per
missing writer per round). With a process group the trainers hear of each other's persists
through the job's store (``agent.trainer.relay``); the committer's trainer then tells its agent
(``NoticePersisted``), and the agent reads each fragment once. :class:`FragmentsHeard` is what
``ckpt.commit.complete`` waits on then (its ``signals``): the notice, with storage looked at
only rarely meanwhile (a trainer that died tells nobody: the agent still commits what storage
holds, just later).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ckpt.storage import Storage
from ckpt.waits import fragment_status


@dataclass
class PersistNotice:
    """``wake`` is set when the committer's trainer says the save's writers all persisted, or
    one failed (``error``: ``"<writer>: <why>"``), or the agent stops."""

    wake: threading.Event = field(default_factory=threading.Event)
    error: str = ""


class FragmentsHeard:
    """``ckpt.commit.complete``'s ``signals`` for the committing agent of a told run."""

    def __init__(self, storage: Storage, step: int, notice: PersistNotice, poll_s: tuple[float, float],
                 stop: threading.Event) -> None:
        self.storage = storage
        self.step = step
        self.notice = notice
        self.first, self.most = poll_s
        self.stop = stop

    def wait_persisted(self, save: str, writers: list[str], *, timeout_s: float, poll_s: float,
                       stop: threading.Event | None = None) -> tuple[list[str], dict[str, str]]:
        """Until told (or storage shows every fragment, looked at after ``poll_s[0]``, then at
        intervals doubling to ``poll_s[1]``): (writers not heard of, the errors of those that failed)."""
        deadline = time.monotonic() + timeout_s
        pending: Sequence[str] = list(writers)
        delay = self.first
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.stop.is_set() or (stop is not None and stop.is_set()):
                return list(pending), {}
            if self.notice.wake.wait(min(delay, left)) and not self.stop.is_set():
                if self.notice.error:
                    writer, _, why = self.notice.error.partition(": ")
                    return [], {writer: why}
                return [], {}
            pending, errors = fragment_status(self.storage, self.step, save, pending)
            if errors:
                return list(pending), dict(e.partition(": ")[::2] for e in errors)
            if not pending:
                return [], {}
            delay = min(delay * 2, self.most)

    def committed(self, save: str, writers: list[str], error: str | None = None) -> None:
        """The committer's trainer tells the other writers (the agent has no store to tell them)."""
