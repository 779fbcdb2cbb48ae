"""Errors of the ``agent`` package; each also inherits ``ckpt``'s base and the fitting builtin.

Both sides raise them: the daemon's servicers turn them into gRPC status codes and the
trainer's client turns the codes back into them, both through :mod:`agent.wire`.
"""

from __future__ import annotations

from ckpt.errors import CheckpointExistsError, CkptError


class AgentError(CkptError):
    """Base class of every error raised by ``agent``."""


class AgentConfigError(AgentError, ValueError):
    """An invalid agent configuration (flag, config file)."""


class PlanError(AgentError, ValueError):
    """A snapshot plan that does not describe the segment it is announced with."""


class InvalidRequestError(AgentError, ValueError):
    """A request that names something it may not (e.g. an address outside the ring)."""


class AgentNotFoundError(AgentError, KeyError):
    """A session, segment or snapshot the agent does not know (or no longer holds)."""


class AgentStateError(AgentError, RuntimeError):
    """The request does not fit the current state: a segment not leased or still holding a
    snapshot, a step older than one held, a step committed from another save."""


class SnapshotExistsError(AgentError, CheckpointExistsError):
    """The agent already holds (or committed) another save of this step for this writer."""


class AgentBudgetError(AgentError, MemoryError):
    """The agent's memory budget cannot hold another buffer."""


class AgentUnavailableError(AgentError, ConnectionError):
    """The node agent cannot be reached: start it (`ckpt-agent serve`) or check the address."""


class AgentDrainingError(AgentUnavailableError):
    """The agent is draining: it finishes what it holds and takes no new work."""


class PeerError(AgentError, ConnectionError):
    """A peer agent could not be reached or sent something unusable."""


class DocumentError(AgentError, ValueError):
    """A document sent in pieces that do not fit together (out of order, short, over the limit)."""


class AnswerTooLargeError(AgentError, OverflowError):
    """An answer that would not fit one gRPC message: stream it (StreamSnapshots) or ask for
    its documents by reference."""
