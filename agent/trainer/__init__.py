"""The trainer side of the node agent: what a training process loads to hand its snapshots to
the agent of its node and to restore from it. It never imports the daemon side
(:mod:`agent.daemon`), nor the daemon side it; both build on the shared modules of
:mod:`agent` (wire, plan, shm, pb, errors).

- ``sink``: :class:`AgentSink`, :class:`ShmAllocator`, :func:`open_agent_sink` (the ``agent``
  entry of ``ckpt.sinks``)
- ``memory``: :class:`AgentMemoryStorage`, the agent-memory and peer tiers of a restore
- ``client``: :class:`AgentClient`, a typed client of the agent's Unix-socket API
"""

from .client import AgentClient
from .memory import AgentMemoryStorage
from .sink import AgentSink, ShmAllocator, open_agent_sink

__all__ = ["AgentClient", "AgentMemoryStorage", "AgentSink", "ShmAllocator", "open_agent_sink"]
