"""The daemon side of the node agent: everything ``ckpt-agent serve`` runs. The trainer side
(:mod:`agent.trainer`) never imports it, nor it the trainer side; both build on the shared
modules of :mod:`agent` (wire, plan, shm, pb, errors).

Modules, each importing only those listed below it:

- ``daemon``: :class:`AgentDaemon`, one running agent (gRPC servers, health, metrics endpoint,
  drain and stop)
- ``servicers``: the gRPC servicers (validate, delegate to the core, answer errors with the
  status codes of :mod:`agent.wire`)
- ``replication``: :class:`Replicator` (replicas to the ring, origin watching and takeover,
  fetching a peer's snapshot for a restore here)
- ``core``: :class:`Agent` (persist and commit through ``ckpt.commit``, retention, drain)
- ``holding``: what is held and the memory it is held in (sessions, segments, snapshots, eviction)
- ``snapshot``: the held records; ``segments``: the agent's shared memory; ``metrics``
"""

from .daemon import AgentDaemon

__all__ = ["AgentDaemon"]
