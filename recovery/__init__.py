"""The Ray coordinator, the launcher and the recovery policies. Imports ``ckpt``, ``agent`` and ``ray``
(``ray`` when ``run`` is first used: a worker process's own modules import without it).

```python
import recovery
result = recovery.run(train_fn, num_workers=4, storage="s3://bucket/run", policy="reload", max_failures=3)
```

Policies: ``"reload"`` (roll back to the newest checkpoint), ``"heal"`` (no rollback: the
survivors' live state, see ``ctx.resume``), ``"auto"`` (heal or reload, per failure).

``train_fn(ctx)`` runs on every worker with ``ctx.rank``, ``ctx.world_size``, ``ctx.attempt``,
``ctx.checkpointer`` (a ``ckpt.Checkpointer`` wired to the node agent, committed by the
coordinator), ``ctx.resume(state)`` (restore, or heal from live state) and
``ctx.report(step, **metrics)`` (heartbeat with progress). See
docs/recovery.md.
"""

from .config import CheckpointConfig, DetectConfig, RunConfig
from .detect import Failure
from .errors import NoRoomError, RecoveryError, TooManyFailuresError
from .events import Event, EventLog
from .heal import AutoHealPolicy, HealableJob, HealPolicy
from .live import LiveState
from .policies import resolve_policy
from .policy import DataParallelJob, JobControl, JobKind, RecoveryOutcome, RecoveryPolicy, ReloadPolicy
from .restore import RestorePoint
from .result import RecoveryRecord, RunResult
from .worker import TrainContext

__all__ = [
    "AutoHealPolicy", "CheckpointConfig", "DataParallelJob", "DetectConfig", "Event", "EventLog", "Failure",
    "HealPolicy", "HealableJob", "JobControl", "JobKind", "LiveState", "NoRoomError", "RecoveryError",
    "RecoveryOutcome", "RecoveryPolicy", "RecoveryRecord", "ReloadPolicy", "RestorePoint", "RunConfig", "RunResult",
    "TooManyFailuresError", "TrainContext", "resolve_policy", "run",
]


def __getattr__(name: str) -> object:
    if name == "run":  # the launcher imports Ray
        from .launcher import run

        return run
    raise AttributeError(f"module 'recovery' has no attribute {name!r}")
