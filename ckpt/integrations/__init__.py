"""Adapters that plug ckpt into the training frameworks people already use.

One module per framework, each imported only when asked for (nothing here imports a framework):

- ``ckpt.integrations.torchtitan``: a torchtitan checkpoint manager.
- ``ckpt.integrations.lightning``: a Lightning ``CheckpointIO`` and a model-parallel strategy.
- ``ckpt.integrations.hf``: a Hugging Face ``TrainerCallback`` and an Accelerate checkpointer.
- ``ckpt.integrations.ray_train``: pointer checkpoints for Ray Train.

Each module raises an ``ImportError`` that names the extra to install when its framework is missing.
"""
