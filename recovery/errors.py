"""Errors of the recovery service: one base class, each also the fitting builtin."""

from __future__ import annotations


class RecoveryError(Exception):
    """Base class of every error raised by ``recovery``."""


class TooManyFailuresError(RecoveryError, RuntimeError):
    """The job failed more often than ``max_failures`` allows. ``result`` holds what was
    recorded up to then (events, failures, recoveries)."""

    def __init__(self, message: str, result: object | None = None) -> None:
        super().__init__(message)
        self.result = result


class NoRoomError(RecoveryError, RuntimeError):
    """The cluster has no room for even ``min_workers`` workers."""


def first_line(e: BaseException) -> str:
    """An error's first line, for an event's message."""
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
