"""Pipeline-parallel training on Ray with stage failures and recovery without rollback.

:class:`RayPipeline` (``runtime``) drives one Ray actor process per stage
(:class:`StageWorker`, ``stage``); the caller gives it the model side of the job, a
:class:`PipelineModel` (``spec``: the stages, how each trains, the data), and the runtime's
knobs, a :class:`PipelineConfig` (data-parallel ``replicas`` per stage, CheckFree+'s
``swap``ped micro-batch order, checkpoints for ``reload``). ``schedule`` says which process runs
what for each micro-batch. A demo model lives outside the library, in
``examples/pipeline_demo``.
"""

from .runtime import RayPipeline
from .schedule import route
from .spec import PipelineConfig, PipelineModel, StageInit, StageLostError, SwappablePipelineModel
from .stage import StageWorker, optimizer_state, stage_state

__all__ = ["PipelineConfig", "PipelineModel", "RayPipeline", "StageInit", "StageLostError", "StageWorker",
           "SwappablePipelineModel", "optimizer_state", "route", "stage_state"]
