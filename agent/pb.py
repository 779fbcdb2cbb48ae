"""The generated gRPC modules, under short names for handwritten code.

``pb`` holds the messages, ``rpc`` the stubs and servicer bases. The generated code itself
lives in ``agent/_proto`` and is produced by ``python -m agent.codegen``.
"""

from __future__ import annotations

from agent._proto.ckpt.agent.v1 import agent_pb2 as pb
from agent._proto.ckpt.agent.v1 import agent_pb2_grpc as rpc

__all__ = ["pb", "rpc"]
