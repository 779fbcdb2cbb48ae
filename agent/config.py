"""The agent's configuration: one frozen dataclass, validated on construction.

It comes from flags, a TOML (or JSON) config file, or both (flags win); nothing is read from
the environment deep inside. See docs/agent.md for every field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AgentConfigError

_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
_HOSTPORT_RE = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})


def parse_size(value: Any, field_name: str) -> int:
    """``1073741824``, ``"1GiB"``, ``"512MiB"``, ``"2G"`` -> bytes."""
    if isinstance(value, bool):
        raise AgentConfigError(f"{field_name}: expected a size, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*", value, re.IGNORECASE)
        if m:
            n = float(m.group(1))
            power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
            base = 1024 if m.group(3).lower().startswith("i") or not m.group(3) else 1000
            return int(n * base**power)
    raise AgentConfigError(f"{field_name}: expected a size like 8GiB or a number of bytes, got {value!r}")


def check_hostport(value: str, field_name: str) -> str:
    if not isinstance(value, str) or not _HOSTPORT_RE.match(value) or not 0 <= int(value.rsplit(":", 1)[1]) < 65536:
        raise AgentConfigError(f"{field_name}: expected host:port, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentConfig:
    socket_path: str  # Unix socket of the trainer/admin API
    memory_budget_bytes: int = 8 << 30  # every shared-memory segment of this agent together
    agent_id: str = ""  # default: <hostname>-<pid>
    socket_mode: int = 0o600  # 0o660 to let a group of trainer users in
    shm_dir: str = "/dev/shm"
    shm_prefix: str = "ckptagent"  # segment names: <prefix>.<agent pid>.<instance>.<n>
    shm_mode: int = 0o600
    persist_workers: int = 2
    io_threads: int = 8  # per persist, when the trainer does not say
    max_message_bytes: int = 16 << 20  # one gRPC message, either way
    stream_chunk_bytes: int = 4 << 20  # bytes of a snapshot, or of a document, per streamed message
    # A document (plan, fragment, commit point, manifest, chunk index) up to this size travels
    # inline; a larger one in pieces or by reference. Four fit in one message with room to spare.
    inline_document_bytes: int = 1 << 20
    max_plan_bytes: int = 64 << 20  # the largest plan accepted (it may span many messages)
    max_sessions: int = 256
    drain_timeout_s: float = 300.0
    # Peers: nothing listens on TCP unless peer_listen is set.
    peer_listen: str | None = None  # host:port to bind, e.g. 127.0.0.1:7460
    advertise_address: str | None = None  # what peers dial; default: peer_listen
    peers: tuple[str, ...] = ()  # the ring: every agent's advertise address, in ring order
    replicas: int = 0  # K: successors in the ring each snapshot is streamed to
    token: str | None = None  # shared secret between agents (required with peers)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    allow_remote_bind: bool = False  # bind peer_listen/metrics to a non-loopback address
    evict_after: str = "persisted"  # or "persisted+replicated"
    peer_timeout_s: float = 30.0
    peer_dead_after_s: float = 10.0  # an origin unreachable this long: its replicas are persisted here
    peer_check_interval_s: float = 1.0
    # A trainer here whose snapshot only a peer holds restores from that peer (fetched over the
    # ring) rather than from storage. Off where storage reads faster than the peer network.
    restore_from_peers: bool = True
    metrics_listen: str | None = None  # host:port of the Prometheus endpoint
    log_format: str = "json"  # or "text"
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not isinstance(self.socket_path, str) or not self.socket_path:
            raise AgentConfigError("socket_path: give the path of the agent's Unix socket")
        if len(os.fsencode(self.socket_path)) > 100:
            raise AgentConfigError(f"socket_path: {self.socket_path!r} is too long for a Unix socket (max ~100 bytes)")
        for name in ("memory_budget_bytes", "persist_workers", "io_threads", "max_message_bytes",
                     "stream_chunk_bytes", "inline_document_bytes", "max_plan_bytes", "max_sessions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise AgentConfigError(f"{name}: expected a positive integer, got {v!r}")
        if self.stream_chunk_bytes + 4096 > self.max_message_bytes:
            raise AgentConfigError("stream_chunk_bytes must be smaller than max_message_bytes (minus 4 KiB)")
        if 4 * self.inline_document_bytes + (64 << 10) > self.max_message_bytes:
            raise AgentConfigError("inline_document_bytes must be at most a quarter of max_message_bytes (minus 64 KiB): "
                                   "a snapshot's listing carries up to four documents inline")
        if not _PREFIX_RE.match(self.shm_prefix):
            raise AgentConfigError(f"shm_prefix: letters, digits and _ (<= 32), got {self.shm_prefix!r}")
        for name in ("socket_mode", "shm_mode"):
            v = getattr(self, name)
            if not isinstance(v, int) or v & ~0o770 or not v & 0o600 == 0o600:
                raise AgentConfigError(f"{name}: expected 0o600 or 0o660 style permissions (no 'other'), got {v!r}")
        for name in ("drain_timeout_s", "peer_timeout_s", "peer_dead_after_s", "peer_check_interval_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise AgentConfigError(f"{name}: expected a positive number of seconds, got {v!r}")
        if self.evict_after not in ("persisted", "persisted+replicated"):
            raise AgentConfigError(f"evict_after: 'persisted' or 'persisted+replicated', got {self.evict_after!r}")
        if self.log_format not in ("json", "text"):
            raise AgentConfigError(f"log_format: 'json' or 'text', got {self.log_format!r}")
        if not isinstance(self.replicas, int) or self.replicas < 0:
            raise AgentConfigError(f"replicas: expected an integer >= 0, got {self.replicas!r}")
        for name in ("allow_remote_bind", "restore_from_peers"):
            if not isinstance(getattr(self, name), bool):
                raise AgentConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        object.__setattr__(self, "peers", tuple(self.peers))
        for p in self.peers:
            check_hostport(p, "peers")
        if len(set(self.peers)) != len(self.peers):
            raise AgentConfigError("peers: an address appears twice in the ring")
        for name in ("peer_listen", "advertise_address", "metrics_listen"):
            v = getattr(self, name)
            if v is not None:
                check_hostport(v, name)
        for name in ("peer_listen", "metrics_listen"):
            v = getattr(self, name)
            if v is not None and not self.allow_remote_bind and v.rsplit(":", 1)[0] not in LOOPBACK_HOSTS:
                raise AgentConfigError(
                    f"{name}: {v} is not a loopback address; set allow_remote_bind = true to listen beyond this host"
                )
        if self.replicas:
            if self.peer_listen is None:
                raise AgentConfigError("replicas > 0 needs peer_listen (the TCP address peers send replicas to)")
            if self.replicas > len(self.peers) - 1:
                raise AgentConfigError(
                    f"replicas: {self.replicas} replicas need at least {self.replicas + 1} agents in peers, "
                    f"got {len(self.peers)}"
                )
            if self.self_address not in self.peers:
                raise AgentConfigError(
                    f"peers: this agent's address {self.self_address} must be in the ring (set advertise_address)"
                )
        if self.peer_listen is not None and not self.token:
            raise AgentConfigError("peer_listen needs a token (token or token_file): peers authenticate with it")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise AgentConfigError("tls_cert and tls_key go together")
        if not self.agent_id:
            object.__setattr__(self, "agent_id", f"{socket.gethostname()}-{os.getpid()}")

    @property
    def self_address(self) -> str | None:
        return self.advertise_address or self.peer_listen

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def ring_successors(self) -> list[str]:
        """The ``replicas`` agents after this one in the ring."""
        if not self.replicas or self.self_address not in self.peers:
            return []
        i = self.peers.index(self.self_address)
        n = len(self.peers)
        return [self.peers[(i + k) % n] for k in range(1, self.replicas + 1)]

    @classmethod
    def from_mapping(cls, doc: dict[str, Any], **overrides: Any) -> AgentConfig:
        """From a config file's table (unknown keys are errors) and flag overrides."""
        known = {f.name for f in dataclasses.fields(cls)}
        merged = dict(doc)
        if "token_file" in merged:
            merged["token"] = _read_token(merged.pop("token_file"))
        for key in ("memory_budget", "memory_budget_bytes"):
            if key in merged:
                merged["memory_budget_bytes"] = parse_size(merged.pop(key), key)
        for key in ("socket_mode", "shm_mode"):
            if isinstance(merged.get(key), str):
                merged[key] = int(merged[key], 8)
        merged.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(merged) - known)
        if unknown:
            raise AgentConfigError(f"unknown configuration key(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**merged)
        except TypeError as e:
            raise AgentConfigError(str(e)) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> AgentConfig:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise AgentConfigError(f"cannot read config file {p}: {e}") from None
        if p.suffix == ".json":
            doc = json.loads(text)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise AgentConfigError("TOML config files need Python 3.11+; use a .json config file") from None
            try:
                doc = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise AgentConfigError(f"{p}: {e}") from None
        doc = doc.get("agent", doc) if isinstance(doc, dict) else doc
        if not isinstance(doc, dict):
            raise AgentConfigError(f"{p}: expected a table of settings")
        return cls.from_mapping(doc, **overrides)


def _read_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise AgentConfigError(f"cannot read token_file {path}: {e}") from None
    if not token:
        raise AgentConfigError(f"token_file {path} is empty")
    return token
