"""``ckpt-agent``: run the node agent (``serve``), ask one for its state (``status``), drain it
(``drain``)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from .config import AgentConfig, parse_size
from .errors import AgentError

DEFAULT_SOCKET = "/run/ckpt-agent/agent.sock"


def _serve(args: argparse.Namespace) -> int:
    from . import logs
    from .daemon import AgentDaemon

    overrides: dict[str, Any] = {
        "socket_path": args.socket, "peer_listen": args.peer_listen, "advertise_address": args.advertise_address,
        "replicas": args.replicas, "metrics_listen": args.metrics_listen, "shm_dir": args.shm_dir,
        "shm_prefix": args.shm_prefix, "log_format": args.log_format, "log_level": args.log_level,
        "drain_timeout_s": args.drain_timeout, "agent_id": args.agent_id, "persist_workers": args.persist_workers,
        "peer_dead_after_s": args.peer_dead_after, "evict_after": args.evict_after,
    }
    if args.memory_budget is not None:
        overrides["memory_budget_bytes"] = parse_size(args.memory_budget, "--memory-budget")
    if args.peers is not None:
        overrides["peers"] = tuple(p for p in args.peers.split(",") if p)
    if args.token_file is not None:
        overrides["token"] = open(args.token_file).read().strip()
    if args.allow_remote_bind:
        overrides["allow_remote_bind"] = True
    if args.no_restore_from_peers:
        overrides["restore_from_peers"] = False
    if args.config:
        config = AgentConfig.from_file(args.config, **overrides)
    else:
        if args.socket is None:
            overrides["socket_path"] = DEFAULT_SOCKET
        config = AgentConfig.from_mapping({}, **overrides)
    logs.setup(config.log_format, config.log_level)
    daemon = AgentDaemon(config)
    daemon.start()
    if args.ready_file:  # lets a supervisor (or a test) know the ports without parsing logs
        with open(args.ready_file + ".tmp", "w") as f:
            json.dump({"socket": config.socket_path, "peer_port": daemon.peer_port,
                       "metrics_port": daemon.metrics_port, "agent_id": config.agent_id}, f)
        import os

        os.replace(args.ready_file + ".tmp", args.ready_file)

    def on_signal(signum: int, _frame: Any) -> None:
        threading.Thread(target=daemon.drain, kwargs={"shutdown": True}, name="agent-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not daemon.wait(0.5):
        pass
    return 0


def _client(args: argparse.Namespace) -> Any:
    from .trainer.client import AgentClient

    return AgentClient(f"unix://{args.socket or DEFAULT_SOCKET}")


def _status(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as c:
        st = c.status()
        snaps = c.list_snapshots("")
    doc = MessageToDict(st, preserving_proto_field_name=True)
    from .wire import PB_TO_STATE

    doc["held"] = [{"run": s.key.run_url, "writer": s.key.writer, "step": s.key.step,
                    "state": PB_TO_STATE[s.state].value,
                    "bytes": s.nbytes, "replica": s.replica} for s in snaps]
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"agent {doc.get('agent_id')}: {doc.get('state')}, {int(doc.get('used_bytes', 0)) / 2**20:.1f} of "
              f"{int(doc.get('budget_bytes', 0)) / 2**20:.1f} MiB used, {doc.get('sessions', 0)} session(s)")
        for h in doc["held"]:
            print(f"  step {h['step']:>10} {h['writer']:<12} {h['state']:<10} {h['bytes'] / 2**20:9.1f} MiB"
                  f"{'  replica' if h['replica'] else ''}  {h['run']}")
    return 0


def _drain(args: argparse.Namespace) -> int:
    with _client(args) as c:
        resp = c.drain(shutdown=args.shutdown, timeout_s=args.timeout or 0.0)
    print(f"drained: {resp.drained}, pending: {resp.pending}")
    return 0 if resp.drained else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckpt-agent", description="Node agent of ckpt: holds snapshots in shared "
                                "memory, persists and replicates them, serves them back for restore.")
    from ckpt.version import __version__

    p.add_argument("--version", action="version", version=f"ckpt-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the agent (SIGTERM drains, then stops)")
    s.add_argument("--config", help="TOML or JSON config file (flags override it)")
    s.add_argument("--socket", help=f"Unix socket for trainers and admin (default {DEFAULT_SOCKET})")
    s.add_argument("--memory-budget", help="shared memory budget, e.g. 16GiB")
    s.add_argument("--peer-listen", help="host:port for peer agents (default: no TCP listener)")
    s.add_argument("--advertise-address", help="host:port peers dial to reach this agent (default --peer-listen)")
    s.add_argument("--peers", help="comma-separated ring of every agent's address, in ring order")
    s.add_argument("--replicas", type=int, help="replicate each snapshot to this many ring successors")
    s.add_argument("--token-file", help="file holding the shared peer token")
    s.add_argument("--allow-remote-bind", action="store_true", help="allow non-loopback listen addresses")
    s.add_argument("--metrics-listen", help="host:port of the Prometheus endpoint (default: off)")
    s.add_argument("--shm-dir", help="shared-memory directory (default /dev/shm)")
    s.add_argument("--shm-prefix", help="segment name prefix (default ckptagent)")
    s.add_argument("--persist-workers", type=int)
    s.add_argument("--peer-dead-after", type=float, help="seconds before a silent origin's replicas are taken over")
    s.add_argument("--evict-after", choices=["persisted", "persisted+replicated"])
    s.add_argument("--no-restore-from-peers", action="store_true",
                   help="restore a snapshot only a peer holds from storage, not from the peer")
    s.add_argument("--drain-timeout", type=float)
    s.add_argument("--agent-id")
    s.add_argument("--log-format", choices=["json", "text"])
    s.add_argument("--log-level")
    s.add_argument("--ready-file", help="write {socket, peer_port, metrics_port} as JSON here once serving")
    s.set_defaults(fn=_serve)
    st = sub.add_parser("status", help="the agent's memory, sessions and held snapshots")
    st.add_argument("--socket")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=_status)
    d = sub.add_parser("drain", help="finish persisting what is held; refuse new snapshots")
    d.add_argument("--socket")
    d.add_argument("--shutdown", action="store_true", help="stop the agent once drained")
    d.add_argument("--timeout", type=float, help="seconds (default: the agent's drain_timeout_s)")
    d.set_defaults(fn=_drain)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except AgentError as e:
        print(f"ckpt-agent: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
