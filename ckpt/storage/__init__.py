"""Storage: one small interface over local files and every fsspec filesystem.

``base`` (the interface: keys and bytes), ``wrapper`` (the one forwarding base), ``local``,
``fsspec``, ``retry``; :func:`open_storage` picks one from a URL.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import StorageError
from .base import TRASH_PREFIX, Buffer, OnPiece, Storage, check_relpath
from .fsspec import FsspecStorage
from .local import LocalStorage
from .retry import RetryingStorage, RetryPolicy, is_transient
from .wrapper import StorageWrapper

__all__ = ["TRASH_PREFIX", "Buffer", "FsspecStorage", "LocalStorage", "OnPiece", "RetryPolicy", "RetryingStorage",
           "Storage", "StorageWrapper", "check_relpath", "is_transient", "open_storage"]


def open_storage(
    url: str | os.PathLike[str] | Storage,
    *,
    storage_options: dict[str, Any] | None = None,
    retry: RetryPolicy | None = None,
) -> Storage:
    """A storage for a run URL: a local path, ``file://``, or any fsspec URL.

    Unknown schemes get an error saying which package to install.
    """
    if isinstance(url, Storage):
        return url
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise StorageError(f"invalid checkpoint URL {url!r}: give a path or an fsspec URL")
    if "://" not in url or url.startswith("file://"):
        inner: Storage = LocalStorage(url.removeprefix("file://"))
    else:
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except ImportError as e:
            raise StorageError(f"cannot open {url!r}: {e}") from None
        except ValueError as e:
            scheme = url.split("://", 1)[0]
            raise StorageError(
                f"cannot open {url!r}: unknown URL scheme {scheme!r} ({e}); "
                "use a local path or a URL of an installed fsspec filesystem"
            ) from None
        inner = FsspecStorage(fs, root, url)
    return RetryingStorage(inner, retry or RetryPolicy())
