"""The ``agent`` sink under the entry point ``agent.sink:open_agent_sink``, which installs made
before the trainer side moved to :mod:`agent.trainer` still name in their metadata (reinstalling
updates it to ``agent.trainer.sink:open_agent_sink``). Nothing in ``agent`` imports this module.
"""

from .trainer.sink import open_agent_sink

__all__ = ["open_agent_sink"]
