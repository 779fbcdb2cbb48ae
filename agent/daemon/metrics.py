"""Prometheus metrics of one agent, in a registry of its own (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# ckpt_agent_restore_fallbacks_total{reason}
PEER_UNREACHABLE = "peer_unreachable"
PEER_FETCH_FAILED = "peer_fetch_failed"
PEER_DOCUMENT_FAILED = "peer_document_failed"
DOCUMENT_UNAVAILABLE = "document_unavailable"
ANSWER_TOO_LARGE = "answer_too_large"
FALLBACK_REASONS = (PEER_UNREACHABLE, PEER_FETCH_FAILED, PEER_DOCUMENT_FAILED, DOCUMENT_UNAVAILABLE, ANSWER_TOO_LARGE)

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class AgentMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.bytes_staged = Counter("ckpt_agent_bytes_staged", "Bytes of snapshots announced staged by trainers",
                                    registry=r)
        self.bytes_persisted = Counter("ckpt_agent_bytes_persisted", "Bytes of snapshots persisted to storage",
                                       registry=r)
        self.bytes_replicated = Counter("ckpt_agent_bytes_replicated", "Bytes of snapshots sent to peer agents",
                                        registry=r)
        self.bytes_received = Counter("ckpt_agent_bytes_received", "Bytes of replicas received from peer agents",
                                      registry=r)
        self.bytes_fetched = Counter("ckpt_agent_bytes_fetched",
                                     "Bytes of snapshots copied from peer agents for a restore here", registry=r)
        self.bytes_served = Counter("ckpt_agent_bytes_served", "Bytes streamed back by ReadSnapshot", registry=r)
        self.persist_seconds = Histogram("ckpt_agent_persist_seconds", "Time to persist one snapshot (flush latency)",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.commit_seconds = Histogram("ckpt_agent_commit_seconds",
                                        "Time from persisted to committed (waiting for the other writers)",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.persist_queue = Gauge("ckpt_agent_persist_queue_depth", "Snapshots waiting to be persisted", registry=r)
        self.failures = Counter("ckpt_agent_failures", "Failures by kind", ["kind"], registry=r)
        self.memory_used = Gauge("ckpt_agent_memory_used_bytes", "Shared memory held by the agent", registry=r)
        self.memory_budget = Gauge("ckpt_agent_memory_budget_bytes", "The agent's memory budget", registry=r)
        self.snapshots = Gauge("ckpt_agent_snapshots", "Snapshots held in memory", ["state"], registry=r)
        self.sessions = Gauge("ckpt_agent_sessions", "Connected trainer sessions", registry=r)
        self.takeovers = Counter("ckpt_agent_replica_takeovers",
                                 "Replicas persisted/committed here because their origin agent was lost", registry=r)
        self.restore_fallbacks = Counter(
            "ckpt_agent_restore_fallbacks",
            "Reads for a restore this agent could not serve, by reason: a peer that did not list what it holds, "
            "a fetch from a peer or a document read through a peer that failed, a document of a snapshot no "
            "longer held, an answer refused as larger than a message", ["reason"], registry=r)
        self.step_tables = Counter(
            "ckpt_agent_step_tables",
            "Answers to GetStepTable: served, or refused (the step is not held whole here, or not at all; the "
            "rank then lists the snapshots)", ["outcome"], registry=r)
        for outcome in ("served", "refused"):
            self.step_tables.labels(outcome)
        for kind in ("persist", "commit", "replicate", "retention", "takeover"):
            self.failures.labels(kind)
        for reason in FALLBACK_REASONS:
            self.restore_fallbacks.labels(reason)

    def serve(self, hostport: str) -> tuple[object, int]:
        """Start the HTTP endpoint; returns (server, port)."""
        host, port = hostport.rsplit(":", 1)
        server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        return server, server.server_port
