"""A pipeline-parallel demo job: a small LLaMA-style model cut into stages (``model``), trained
on the Python standard library's sources (``data``) with AdamW under warmup and cosine decay
(``train``), and the three given to :class:`recovery.pipeline.RayPipeline` as its model side
(``task.TextPipeline``). Used by the tests and by ``experiments/checkfree``.

```python
from examples.pipeline_demo import ModelConfig, TextPipeline, TrainConfig
from recovery.pipeline import PipelineConfig, RayPipeline

pipe = RayPipeline(PipelineConfig(checkpoint_url="file:///ckpt/pp", checkpoint_every=50),
                   TextPipeline(model=ModelConfig(num_stages=4), train=TrainConfig(total_steps=1000)))
pipe.run(1000, policy="auto", max_failures=10)
```
"""

from .data import TextData, stdlib_corpus
from .model import Block, ModelConfig, RMSNorm, Stage, build_stages
from .task import TextPipeline
from .train import TrainConfig, build_optimizer, lr_factor, set_schedule_step

__all__ = [
    "Block", "ModelConfig", "RMSNorm", "Stage", "TextData", "TextPipeline", "TrainConfig", "build_optimizer",
    "build_stages", "lr_factor", "set_schedule_step", "stdlib_corpus",
]
