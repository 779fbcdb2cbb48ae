"""The Checkpointer's configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from .io import DEFAULT_IO_THREADS
from .plan import DEFAULT_MAX_CHUNK_BYTES
from .storage import RetryPolicy, Storage


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointerConfig:
    """Everything a :class:`Checkpointer` can be told, validated on construction."""

    url: Any  # a path, an fsspec URL, or a ckpt.Storage
    every_n_steps: int = 100
    keep_last: int | None = 3  # None: keep every checkpoint
    keep_every: int | None = None  # also keep steps divisible by this
    # How each writer lays out a checkpoint: "packs" (a few files per writer: 2 x writers + 1
    # per step) or "chunks" (one file per chunk at its zarr key: zarr-readable at once).
    layout: Literal["packs", "chunks"] = "packs"
    # Which packs steps rank 0 rewrites into the zarr layout in the background: "kept" (the
    # steps kept for good by keep_every, and the last one at close()) or "never".
    consolidate: Literal["kept", "never"] = "kept"
    host_budget_bytes: int | None = None  # None: twice the first snapshot
    when_busy: Literal["block", "skip"] = "block"
    # With "block": how long save() may wait for a host buffer before it fails this checkpoint
    # (reported like any other failure; training goes on). A storage or node agent that never
    # lets go of the previous snapshots must not stop training. None: wait as long as it takes.
    buffer_wait_timeout_s: float | None = 600.0
    on_error: Literal["warn", "raise"] = "warn"
    io_threads: int = DEFAULT_IO_THREADS
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
    durable: bool = True
    commit_timeout_s: float = 600.0
    allow_pickle: bool = False
    storage_options: dict[str, Any] | None = None
    retry: RetryPolicy | None = None
    process_group: Any = None
    pin_memory: bool | None = None  # None: pinned when the state lives on CUDA
    agent: str | None = None  # a node agent's address ("unix:///run/ckpt/agent.sock"): it takes the snapshots
    # Who commits: "rank0" (rank 0's sink, once every writer's fragment is durable), or
    # "external" (no rank commits; a coordinator does, with ckpt.sink.wait_for_fragments and
    # ckpt.commit, and runs retention). The handles' ``committed`` futures resolve when the
    # commit point appears either way.
    commit_by: Literal["rank0", "external"] = "rank0"
    # Prometheus metrics (docs/metrics.md): True (the process-wide default registry), False (none),
    # or a prometheus_client CollectorRegistry. OpenTelemetry spans follow the application's tracer.
    metrics: Any = True
    # Arrays every rank holds whole (data-parallel replicas) on restore: "once" (one rank reads
    # each, broadcast to the others), "each" (every rank reads all), "auto" (once from storage,
    # each from a node agent's memory). See ckpt.replicated.
    replicated_reads: Literal["auto", "once", "each"] = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.url, (str, os.PathLike, Storage)) or not str(self.url):
            raise ValueError(f"CheckpointerConfig.url must be a path, an fsspec URL or a Storage, got {self.url!r}")
        if isinstance(self.every_n_steps, bool) or not isinstance(self.every_n_steps, int) or self.every_n_steps < 1:
            raise ValueError(f"CheckpointerConfig.every_n_steps must be an integer >= 1, got {self.every_n_steps!r}")
        if self.keep_last is not None and (not isinstance(self.keep_last, int) or self.keep_last < 1):
            raise ValueError(f"CheckpointerConfig.keep_last must be >= 1 or None, got {self.keep_last!r}")
        if self.keep_every is not None and (not isinstance(self.keep_every, int) or self.keep_every < 1):
            raise ValueError(f"CheckpointerConfig.keep_every must be >= 1 or None, got {self.keep_every!r}")
        if self.host_budget_bytes is not None and self.host_budget_bytes < 1:
            raise ValueError("CheckpointerConfig.host_budget_bytes must be >= 1 or None")
        if self.when_busy not in ("block", "skip"):
            raise ValueError(f"CheckpointerConfig.when_busy must be 'block' or 'skip', got {self.when_busy!r}")
        if self.buffer_wait_timeout_s is not None and not self.buffer_wait_timeout_s > 0:
            raise ValueError(f"CheckpointerConfig.buffer_wait_timeout_s must be > 0 or None, got "
                             f"{self.buffer_wait_timeout_s!r}")
        if self.on_error not in ("warn", "raise"):
            raise ValueError(f"CheckpointerConfig.on_error must be 'warn' or 'raise', got {self.on_error!r}")
        if self.layout not in ("packs", "chunks"):
            raise ValueError(f"CheckpointerConfig.layout must be 'packs' or 'chunks', got {self.layout!r}")
        if self.consolidate not in ("kept", "never"):
            raise ValueError(f"CheckpointerConfig.consolidate must be 'kept' or 'never', got {self.consolidate!r}")
        if self.replicated_reads not in ("auto", "once", "each"):
            raise ValueError(f"CheckpointerConfig.replicated_reads must be 'auto', 'once' or 'each', got "
                             f"{self.replicated_reads!r}")
        if self.commit_by not in ("rank0", "external"):
            raise ValueError(f"CheckpointerConfig.commit_by must be 'rank0' or 'external', got {self.commit_by!r}")
        if self.agent is not None and (not isinstance(self.agent, str) or "://" not in self.agent):
            raise ValueError(f"CheckpointerConfig.agent must be an address like 'unix:///path/agent.sock', got {self.agent!r}")
        if not (isinstance(self.metrics, bool) or hasattr(self.metrics, "register")):
            raise ValueError(f"CheckpointerConfig.metrics must be True, False or a prometheus_client registry, "
                             f"got {self.metrics!r}")
        if self.io_threads < 1 or self.max_chunk_bytes < 1 or self.commit_timeout_s <= 0:
            raise ValueError("CheckpointerConfig: io_threads, max_chunk_bytes, commit_timeout_s must be positive")
