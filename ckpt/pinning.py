"""Registering memory that someone else allocated (a node agent's shared-memory segment) with
CUDA as pinned memory, so that device→host copies into it run on the copy engine at full speed.

Two traps, both met on a real GPU:

- A failed ``cudaHostRegister`` leaves its error as the CUDA runtime's *last error* of the
  calling thread, and torch's next kernel-launch check reports it as its own failure (an
  "invalid argument" raised by a GELU). After a failure the error is taken off, so a segment
  that cannot be pinned (a mapping of a file on disk, say) only costs speed.
- A registration outlives the mapping: memory unmapped while still registered leaves the range
  registered in the driver, and the next allocation that reuses the addresses (ours, or a pinned
  stager's ``malloc``) fails with "already registered". Every registration is undone with
  :func:`unregister` before its memory is unmapped.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

log = logging.getLogger(__name__)

_SUCCESS = 0


@functools.lru_cache(maxsize=1)
def _runtime_library() -> ctypes.CDLL | None:
    """The CUDA runtime library torch itself loaded (its last-error state is the one to clear)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            lib.cudaGetLastError.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError):
            continue
    return None


def clear_last_error() -> None:
    """Take the calling thread's pending CUDA runtime error off, so that torch's next launch
    check does not report it."""
    lib = _runtime_library()
    if lib is not None:
        lib.cudaGetLastError()
        return
    # No shared runtime to call (statically linked): a launch whose check consumes the error.
    for _ in range(2):
        try:
            torch.empty(1, device="cuda").fill_(0)
            return
        except RuntimeError:
            continue


def _error_name(err: int) -> str:
    try:
        return f"{err} ({torch.cuda.cudart().cudaGetErrorString(err)})"
    except Exception:  # noqa: BLE001 - only for the message
        return str(err)


def register(ptr: int, nbytes: int) -> bool:
    """Pin ``nbytes`` at ``ptr`` for CUDA; False (and a warning) when the driver refuses."""
    if not nbytes or not torch.cuda.is_available():
        return False
    cudart = torch.cuda.cudart()
    err = int(cudart.cudaHostRegister(ptr, nbytes, 0))
    if err == _SUCCESS:
        return True
    clear_last_error()
    log.warning("cudaHostRegister of %d bytes failed: %s; staging into this memory runs unpinned (slower). "
                "Shared memory on tmpfs (/dev/shm) can be pinned; a file on disk usually cannot.",
                nbytes, _error_name(err))
    return False


def unregister(ptr: int) -> None:
    """Undo :func:`register` (before the memory is unmapped)."""
    err = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if err != _SUCCESS:
        clear_last_error()
        log.warning("cudaHostUnregister failed: %s", _error_name(err))
