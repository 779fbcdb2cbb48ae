"""Errors of the ``ckpt`` package.

Every error inherits :class:`CkptError` and the builtin that fits, so callers can catch either
(``except FileNotFoundError`` keeps working). Messages say what to do next.
"""

from __future__ import annotations


class CkptError(Exception):
    """Base class of every error raised by ``ckpt``."""


class CheckpointNotFoundError(CkptError, FileNotFoundError):
    """No committed checkpoint where one was asked for."""


class CheckpointExistsError(CkptError, FileExistsError):
    """A committed checkpoint already exists at the step being saved."""


class CorruptCheckpointError(CkptError, IOError):
    """Stored data does not match what the checkpoint recorded (missing, truncated, bad checksum).

    ``problems`` lists every problem found, each naming the tensor and the chunk.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class StateMismatchError(CkptError, ValueError):
    """The state to load into does not match the checkpoint (keys, shapes, dtypes).

    All mismatches are collected and reported at once in ``problems``.
    """

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = list(problems)


class LayoutError(CkptError, ValueError):
    """A tensor layout is invalid or cannot be stored (bad shard spec, unsupported placement)."""


class FormatError(CkptError, ValueError):
    """Metadata that is not a valid checkpoint of a format version this library reads."""


class CommitError(CkptError, RuntimeError):
    """The fragments of a checkpoint do not cover every chunk exactly once; nothing was committed."""


class StorageError(CkptError, OSError):
    """A storage operation failed permanently (after retries, or at once for permanent errors)."""


class UnsupportedValueError(CkptError, TypeError):
    """A non-tensor value cannot be stored as JSON and pickling was not allowed."""


class UnsafeCheckpointError(FormatError):
    """A checkpoint from elsewhere asks to run code to be read (a pickle naming a global outside
    the allow-list); refused before any of it is used."""
