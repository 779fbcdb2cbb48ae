"""What every servicer shares: agent errors answered with the status code
:func:`agent.wire.status_of` gives them (unary and streaming handlers), and the checks of the
fields many requests carry."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ..pb import pb
from ..wire import status_of

log = logging.getLogger(__name__)

WRITER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
MAX_URL = 4096
MAX_ID = 256
MAX_PEERS = 1 << 16  # agents one listing may name (a directory of who holds what)


def _abort(context: grpc.ServicerContext, e: BaseException) -> None:
    code = status_of(e)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error in an RPC")
    context.abort(code, str(e) if code is not grpc.StatusCode.INTERNAL else f"internal error: {type(e).__name__}: {e}")


def rpc_errors(fn: Callable) -> Callable:
    """Map the agent's exceptions to gRPC status codes (unary answers)."""
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as e:  # noqa: BLE001 - every error becomes a status
            if isinstance(e, grpc.RpcError) or context.code() is not None:
                raise
            _abort(context, e)
    return wrapper


def stream_errors(fn: Callable) -> Callable:
    """The same for handlers that stream their answer."""
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, grpc.RpcError) or context.code() is not None:
                raise
            _abort(context, e)
    return wrapper


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_key(key: pb.SnapshotKey) -> tuple[str, str, int]:
    check(0 < len(key.run_url) <= MAX_URL, "key.run_url: required")
    check(bool(WRITER_RE.match(key.writer)), "key.writer: required (letters, digits, _.-)")
    check(key.step >= 0, "key.step: must be >= 0")
    return key.run_url, key.writer, key.step
