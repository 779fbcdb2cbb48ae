"""Where the agent's Python types meet their gRPC form; the only module that maps them.

- Snapshot states: the engine's :class:`ckpt.SnapshotState` is the one home of the idea; the
  agent holds a snapshot in four of its states (staged, persisted, committed, failed), and
  those four are what ``pb.SnapshotState`` carries. Captured and skipped never leave a trainer.
- Errors: the daemon's servicers turn an :mod:`agent.errors` error into a status code
  (:func:`status_of`); the trainer turns the status of a failed call back into an error
  (:func:`error_from_rpc`) where it acts on the difference.
"""

from __future__ import annotations

from types import MappingProxyType

import grpc

from ckpt import SnapshotState

from .errors import (
    AgentBudgetError,
    AgentError,
    AgentNotFoundError,
    AgentStateError,
    AgentUnavailableError,
    AnswerTooLargeError,
    PeerError,
    SnapshotExistsError,
)
from .pb import pb

STATE_TO_PB = MappingProxyType({
    SnapshotState.STAGED: pb.SNAPSHOT_STATE_STAGED,
    SnapshotState.PERSISTED: pb.SNAPSHOT_STATE_PERSISTED,
    SnapshotState.COMMITTED: pb.SNAPSHOT_STATE_COMMITTED,
    SnapshotState.FAILED: pb.SNAPSHOT_STATE_FAILED,
})
PB_TO_STATE = MappingProxyType({v: k for k, v in STATE_TO_PB.items()})

# Most specific first; anything not listed is INTERNAL (and logged with its traceback).
_STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (AgentNotFoundError, grpc.StatusCode.NOT_FOUND),
    (AgentStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (SnapshotExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (AgentUnavailableError, grpc.StatusCode.UNAVAILABLE),  # draining
    (PeerError, grpc.StatusCode.UNAVAILABLE),
    (AgentBudgetError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AnswerTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # PlanError, InvalidRequestError, a malformed field
)


def status_of(error: BaseException) -> grpc.StatusCode:
    """The status code a servicer answers ``error`` with."""
    for kind, code in _STATUS_OF:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def error_from_rpc(error: grpc.RpcError, what: str) -> AgentError:
    """The agent error a failed call of the trainer stands for; ``what`` says what was tried."""
    if not isinstance(error, grpc.Call):  # every failed call is one; a bare RpcError has no status
        return AgentError(f"{what}: {error}")
    code, details = error.code(), error.details()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return AgentBudgetError(f"{what}: {details}")
    if code == grpc.StatusCode.ALREADY_EXISTS:
        return SnapshotExistsError(f"{what}: {details}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return AgentUnavailableError(f"{what}: the node agent is unavailable ({details})")
    return AgentError(f"{what}: {code}: {details}")
