"""The library's version, and the versions a manifest records."""

from __future__ import annotations

import platform

__version__ = "0.1.0"


def library_versions() -> dict[str, str]:
    import torch

    return {"ckpt": __version__, "torch": torch.__version__, "python": platform.python_version()}
