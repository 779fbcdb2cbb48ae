"""Configuration of a recovered job: frozen dataclasses, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal


def _positive(owner: str, name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{owner}.{name} must be a {'non-negative' if allow_zero else 'positive'} number, "
                         f"got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class DetectConfig:
    """When the coordinator calls something a failure."""

    hang_timeout_s: float = 30.0  # no heartbeat progress (a higher step) for this long: a hang
    startup_timeout_s: float = 300.0  # before a rank's first report (process group, restore)...
    # ... plus this much per rank of the attempt: process-group (NCCL communicator) set-up grows
    # with the world (10,000 ranks: 300 + 300 s). startup_timeout_for(world) is what applies.
    startup_timeout_per_rank_s: float = 0.03
    heartbeat_interval_s: float = 0.2  # ctx.report sends at most this often (and on a new checkpoint)
    storage_failure_limit: int = 3  # this many checkpoints failing in a row: a storage failure
    agent_timeout_s: float = 30.0  # an agent silent this long: an agent failure
    # How often a node agent sends its ranks' heartbeats (and its own status) on, in one call per
    # node to the leader agent of its relay group, which sends its group's in one call to the
    # coordinator. None: 0.25 s, longer with many groups so that the coordinator takes at most
    # RELAY_CALLS_PER_S calls a second, and at most 1/5 of the hang and agent timeouts (two hops).
    # 10,000 ranks on 1,250 nodes, 40 groups: every 2 s. One call costs the coordinator's process
    # about 1 ms of CPU, most of it Ray's delivery of a call to an actor (0.56 ms for an empty
    # call), plus a few microseconds per heartbeat. Checkpoint events go on within 50 ms a hop.
    relay_interval_s: float | None = None
    # Stragglers (docs/recovery.md, "Stragglers"): a rank whose median compute time per step over
    # the last straggler_window_s (ctx.timed / ctx.compute_time; without them, the time between
    # its reports) is at least straggler_factor times its peers' median is reported (an event and
    # a metric), once it was measured for a whole window and over straggler_min_steps steps in it.
    straggler_factor: float = 1.5
    straggler_window_s: float = 30.0
    straggler_min_steps: int = 5
    # A rank reported as a straggler for this long is a failure of kind "straggler", which the
    # policy answers like any other (reload: every worker restarted). None: only reported.
    replace_stragglers_after_s: float | None = None

    RELAY_CALLS_PER_S = 20.0

    def startup_timeout_for(self, world_size: int) -> float:
        """The time a rank of an attempt of ``world_size`` ranks gets before its first report."""
        return self.startup_timeout_s + self.startup_timeout_per_rank_s * max(0, world_size)

    def __post_init__(self) -> None:
        for name in ("hang_timeout_s", "startup_timeout_s", "heartbeat_interval_s", "agent_timeout_s"):
            _positive("DetectConfig", name, getattr(self, name))
        if self.startup_timeout_per_rank_s < 0:
            raise ValueError(f"DetectConfig.startup_timeout_per_rank_s must be >= 0, got {self.startup_timeout_per_rank_s!r}")
        if self.relay_interval_s is not None:
            _positive("DetectConfig", "relay_interval_s", self.relay_interval_s)
        _positive("DetectConfig", "straggler_window_s", self.straggler_window_s)
        _positive("DetectConfig", "straggler_factor", self.straggler_factor)
        if self.straggler_factor <= 1:
            raise ValueError(f"DetectConfig.straggler_factor must be above 1 (a rank this many times slower than its "
                             f"peers is a straggler), got {self.straggler_factor!r}")
        if isinstance(self.straggler_min_steps, bool) or not isinstance(self.straggler_min_steps, int) \
                or self.straggler_min_steps < 1:
            raise ValueError(f"DetectConfig.straggler_min_steps must be an integer >= 1, "
                             f"got {self.straggler_min_steps!r}")
        if self.replace_stragglers_after_s is not None:
            _positive("DetectConfig", "replace_stragglers_after_s", self.replace_stragglers_after_s)
        if not isinstance(self.storage_failure_limit, int) or self.storage_failure_limit < 1:
            raise ValueError(f"DetectConfig.storage_failure_limit must be an integer >= 1, "
                             f"got {self.storage_failure_limit!r}")

    def relay_interval(self, nodes: int, group: int = 1) -> float:
        """The node agents' relay interval for a job on ``nodes`` nodes in relay groups of ``group``."""
        if self.relay_interval_s is not None:
            return self.relay_interval_s
        # never so long that a hang or a silent agent is seen late or wrongly (two hops)
        cap = min(self.hang_timeout_s, self.agent_timeout_s) / 5
        return max(0.25, min(cap, -(-nodes // group) / self.RELAY_CALLS_PER_S))


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointConfig:
    """What the workers' Checkpointer is built with; the coordinator commits and runs retention."""

    every_n_steps: int = 100
    keep_last: int | None = 3  # None: keep every checkpoint
    keep_every: int | None = None
    commit_timeout_s: float = 600.0
    options: dict[str, Any] = field(default_factory=dict)  # any other ckpt.Checkpointer option

    def __post_init__(self) -> None:
        if not isinstance(self.every_n_steps, int) or isinstance(self.every_n_steps, bool) or self.every_n_steps < 1:
            raise ValueError(f"CheckpointConfig.every_n_steps must be an integer >= 1, got {self.every_n_steps!r}")
        if self.keep_last is not None and (not isinstance(self.keep_last, int) or self.keep_last < 1):
            raise ValueError(f"CheckpointConfig.keep_last must be >= 1 or None, got {self.keep_last!r}")
        _positive("CheckpointConfig", "commit_timeout_s", self.commit_timeout_s)
        reserved = {"agent", "commit_by", "process_group", "every_n_steps", "keep_last", "keep_every"} & set(self.options)
        if reserved:
            raise ValueError(f"CheckpointConfig.options may not set {sorted(reserved)}: recovery sets them")


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig:
    """One job: how many workers, where checkpoints go, how failures are handled."""

    num_workers: int
    storage: str  # the run's URL: a path, file://, s3://bucket/prefix, ...
    max_failures: int = 3  # failures recovered from; one more aborts the job (-1: no limit)
    min_workers: int = 1  # shrink down to this many when the cluster has no room for all
    allow_grow: bool = False  # grow back to num_workers when room returns
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    placement_timeout_s: float = 30.0  # wait this long for room for a world size before trying fewer
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl when workers have a GPU
    collective_timeout_s: float = 1800.0  # torch.distributed timeout; failures never wait for it
    backoff_s: float = 1.0  # before restart n >= 2 in a row: backoff_s * 2**(n-2), at most backoff_max_s (the 1st: none)
    backoff_max_s: float = 30.0
    settle_timeout_s: float = 30.0  # wait this long for agents to persist what they hold before choosing
    # "actor": one agent per node, run by recovery; "unix:///path": an agent already runs on every
    # node at that path (the DaemonSet); None: no agent, workers persist in-process.
    agent: str | None = "actor"
    agent_memory_bytes: int = 4 << 30
    # With agent="actor": stream each staged snapshot to this many other nodes' agents (over TCP
    # on the nodes' addresses, authenticated with a per-job token), so that losing a node loses
    # no snapshot it staged and the restore reads the lost node's part from a peer's memory.
    agent_replicas: int = 0
    coordinator_max_restarts: int = 10
    # Restart in place: on a failure only the lost workers (or a hang's culprits) are replaced; the
    # others keep their processes (imports, CUDA context, memory) and re-enter train_fn in the next
    # attempt. A survivor that does not stop within interrupt_timeout_s is replaced too.
    in_place: bool = True
    # Hot spares: this many worker processes booted ahead in bundles of their own (each holds a
    # worker's resources), where the cluster has room beyond the ranks; a lost rank is replaced by
    # one at once instead of by a process that must boot (recovery.spares).
    spares: int = 0
    # Warm standbys: this many worker processes per node booted ahead that hold no resources (a
    # few hundred MB of host memory each); a process that dies on a node that lives on is
    # replaced, in place, by its node's standby, which takes the lost process's GPU
    # (recovery.spares.Standbys). 0: a replacement boots a new process (seconds).
    standby: int = 1
    interrupt_timeout_s: float = 5.0
    poll_interval_s: float = 0.2
    # The job's metrics (recovery.metrics, docs/metrics.md): "ray" (Ray's metrics, exported at the
    # nodes' Ray Prometheus endpoints), a prometheus_client CollectorRegistry, or None (none).
    metrics: Any = "ray"
    detect: DetectConfig = field(default_factory=DetectConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"RunConfig.num_workers must be an integer >= 1, got {self.num_workers!r}")
        if not isinstance(self.min_workers, int) or not 1 <= self.min_workers <= self.num_workers:
            raise ValueError(f"RunConfig.min_workers must be within 1..num_workers ({self.num_workers}), "
                             f"got {self.min_workers!r}")
        if not isinstance(self.storage, str) or not self.storage:
            raise ValueError(f"RunConfig.storage must be a path or an fsspec URL, got {self.storage!r}")
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ValueError(f"RunConfig.max_failures must be an integer >= 0, or -1 for no limit, "
                             f"got {self.max_failures!r}")
        if not isinstance(self.resources_per_worker, dict) or any(
                not isinstance(v, (int, float)) or v < 0 for v in self.resources_per_worker.values()):
            raise ValueError(f"RunConfig.resources_per_worker must map resource names to amounts >= 0, "
                             f"got {self.resources_per_worker!r}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"RunConfig.placement_strategy: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                             f"got {self.placement_strategy!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"RunConfig.backend must be 'auto', 'gloo' or 'nccl', got {self.backend!r}")
        for name in ("placement_timeout_s", "collective_timeout_s", "backoff_max_s", "settle_timeout_s",
                     "poll_interval_s", "interrupt_timeout_s"):
            _positive("RunConfig", name, getattr(self, name))
        _positive("RunConfig", "backoff_s", self.backoff_s, allow_zero=True)
        if self.agent is not None and self.agent != "actor" and not str(self.agent).startswith("unix://"):
            raise ValueError(f"RunConfig.agent must be 'actor', an address 'unix:///path/agent.sock' or None, "
                             f"got {self.agent!r}")
        if not isinstance(self.agent_memory_bytes, int) or self.agent_memory_bytes < 1:
            raise ValueError(f"RunConfig.agent_memory_bytes must be a positive integer, got {self.agent_memory_bytes!r}")
        if isinstance(self.agent_replicas, bool) or not isinstance(self.agent_replicas, int) or self.agent_replicas < 0:
            raise ValueError(f"RunConfig.agent_replicas must be an integer >= 0, got {self.agent_replicas!r}")
        for name in ("spares", "standby"):
            if isinstance(v := getattr(self, name), bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"RunConfig.{name} must be an integer >= 0, got {v!r}")
        if self.agent_replicas and self.agent != "actor":
            raise ValueError("RunConfig.agent_replicas needs agent='actor'; an external agent replicates by its own "
                             "configuration (peers, replicas)")
        if not (self.metrics is None or self.metrics == "ray" or hasattr(self.metrics, "register")):
            raise ValueError(f"RunConfig.metrics must be 'ray', a prometheus_client CollectorRegistry or None, "
                             f"got {self.metrics!r}")
        if not isinstance(self.coordinator_max_restarts, int) or self.coordinator_max_restarts < -1:
            raise ValueError("RunConfig.coordinator_max_restarts must be an integer >= -1 (-1: no limit)")

    @property
    def uses_gpu(self) -> bool:
        return self.resources_per_worker.get("GPU", 0) > 0

    @property
    def torch_backend(self) -> str:
        if self.backend == "auto":
            return "nccl" if self.uses_gpu else "gloo"
        return self.backend

    def backoff_for(self, consecutive: int) -> float:
        """Seconds to wait before the ``consecutive``-th restart in a row (1-based). The first
        restart after progress (a committed checkpoint since the last one) is immediate: a job
        that failed once is not crash-looping, and every second of waiting is a second of the
        whole job idle. From the second in a row on, ``backoff_s`` doubling."""
        if consecutive < 2 or self.backoff_s == 0:
            return 0.0
        return min(self.backoff_max_s, self.backoff_s * 2 ** (consecutive - 2))
