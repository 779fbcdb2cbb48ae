"""Pipeline-parallel training on Ray with stage failures and recovery without rollback.

:class:`RayPipeline` (``runtime``) drives one Ray actor process per stage
(:class:`StageWorker`, ``stage``); the caller gives it the model side of the job, a
:class:`PipelineModel` (``spec``: the stages, how each trains, the data), and the runtime's
knobs, a :class:`PipelineConfig`. A demo model lives outside the library, in
``examples/pipeline_demo``.
"""

from .runtime import RayPipeline
from .spec import PipelineConfig, PipelineModel, StageLostError
from .stage import StageWorker, optimizer_state, stage_state

__all__ = ["PipelineConfig", "PipelineModel", "RayPipeline", "StageLostError", "StageWorker", "optimizer_state",
           "stage_state"]
