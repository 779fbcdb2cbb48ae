"""Ray Train integration: ckpt's committed steps as Ray Train pointer checkpoints.

Ray Train (the v2 API, ``ray.train.torch.TorchTrainer``'s default since Ray 2.60) stores a
small directory per reported checkpoint; ckpt stores the tensors. :class:`RayTrainReporter`
reports each committed step as a pointer (the ckpt run's URL and the step), restores from
``ray.train.get_checkpoint()`` with any number of workers, and leaves retention to Ray Train's
``CheckpointConfig(num_to_keep=...)``: a step's data is deleted once Ray no longer lists its
pointer. See docs/integrations/ray_train.md.
"""

from __future__ import annotations

try:
    import ray.train  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"ckpt.integrations.ray_train needs Ray Train ({e}): pip install 'ckpt[ray-train]'") from e

from .pointer import POINTER_FILE, STEP_METRIC, Pointer, read_pointer
from .reporter import RayTrainReporter
from .retention import OWNER_FILE, steps_to_delete

__all__ = [
    "OWNER_FILE",
    "POINTER_FILE",
    "STEP_METRIC",
    "Pointer",
    "RayTrainReporter",
    "read_pointer",
    "steps_to_delete",
]
