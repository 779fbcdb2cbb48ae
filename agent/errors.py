"""Errors of the ``agent`` package; each also inherits ``ckpt``'s base and the fitting builtin."""

from __future__ import annotations

from ckpt.errors import CheckpointExistsError, CkptError


class AgentError(CkptError):
    """Base class of every error raised by ``agent``."""


class AgentConfigError(AgentError, ValueError):
    """An invalid agent configuration (flag, config file)."""


class PlanError(AgentError, ValueError):
    """A snapshot plan that does not describe the segment it is announced with."""


class AgentUnavailableError(AgentError, ConnectionError):
    """The node agent cannot be reached: start it (`ckpt-agent serve`) or check the address."""


class AgentBudgetError(AgentError, MemoryError):
    """The agent's memory budget cannot hold another buffer."""


class InvalidRequestError(AgentError, ValueError):
    """A request that names something it may not (e.g. an address outside the ring)."""


class PeerError(AgentError, ConnectionError):
    """A peer agent could not be reached or sent something unusable."""


class SnapshotExistsError(AgentError, CheckpointExistsError):
    """The agent already holds (or committed) another save of this step for this writer."""
