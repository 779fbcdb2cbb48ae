"""Security: no code runs from a checkpoint by default; tensor names that would leave the
checkpoint directory are refused on save, load and by the CLI; the node agent listens on
nothing but its Unix socket by default, refuses non-loopback binds, authenticates peers and
bounds request sizes."""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import json
import os
import pickle
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

import ckpt
from ckpt import format as fmt
from ckpt.cli import main as cli

REPO = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _pickle_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    run, marker = tmp_path / "run", tmp_path / "code-ran"
    ckpt.save({"w": torch.ones(3), "evil": _Payload(str(marker))}, str(run), step=1, allow_pickle=True)
    assert not marker.exists()
    return run, marker


def test_a_pickle_payload_in_a_checkpoint_never_runs_by_default(tmp_path):
    run, marker = _pickle_checkpoint(tmp_path)
    with pytest.raises(ckpt.UnsupportedValueError, match="pickled"):
        ckpt.load({"w": torch.zeros(3), "evil": None}, str(run))
    ck = ckpt.Checkpointer(str(run))
    with pytest.raises(ckpt.UnsupportedValueError):
        ck.restore({"w": torch.zeros(3), "evil": None})
    ck.close()
    for argv in (["inspect", str(run)], ["inspect", str(run), "--json"], ["verify", str(run)], ["ls", str(run)],
                 ["export", str(run), str(tmp_path / "out.safetensors")], ["export", str(run), str(tmp_path / "o.pt")],
                 ["reshard", str(run), "--to", "whole", str(tmp_path / "re")]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli(argv)
    import zarr  # any zarr reader: attributes are JSON

    zarr.open_group(str(run / fmt.step_dir(1)), mode="r").attrs.asdict()
    assert not marker.exists(), "code from the checkpoint ran"
    # The payload is real: opting in on load runs it.
    ckpt.load({"w": torch.zeros(3), "evil": None}, str(run), allow_pickle=True)
    assert marker.exists()


def test_a_pickle_planted_by_hand_never_runs_either(tmp_path):
    # A hostile writer does not need allow_pickle: it writes the tag itself.
    run, marker = tmp_path / "run", tmp_path / "code-ran"
    ckpt.save({"w": torch.ones(3), "cfg": {"a": 1}}, str(run), step=1)
    root = run / fmt.step_dir(1) / fmt.META
    doc = json.loads(root.read_text())
    doc["attributes"].pop(fmt.SEAL_KEY)
    payload = base64.b64encode(pickle.dumps(_Payload(str(marker)))).decode()
    doc["attributes"]["ckpt"]["values"]["cfg"] = {"__ckpt__": "pickle", "v": payload}
    root.write_bytes(fmt.dumps(fmt.seal_root(doc)))
    with pytest.raises(ckpt.UnsupportedValueError):
        ckpt.load({"w": torch.zeros(3), "cfg": None}, str(run))
    assert not marker.exists()


def _weights_only(call: ast.Call) -> bool:
    return any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def test_nothing_unpickles_or_evaluates_outside_the_opt_in():
    """Static check: pickle.load(s), torch.load (but with weights_only=True), eval and exec appear
    in ckpt/ and agent/ only where allow_pickle guards them (ckpt/state.py Opaque.decode), and
    every Unpickler subclass (the DCP metadata's) restricts find_class to an allow-list."""
    calls, unpicklers = [], []
    for base in ("ckpt", "agent"):
        for path in (REPO / base).rglob("*.py"):
            if "_proto" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    f = node.func
                    name = f"{getattr(f.value, 'id', '?')}.{f.attr}" if isinstance(f, ast.Attribute) else getattr(
                        f, "id", "")
                    if name == "torch.load" and _weights_only(node):
                        continue
                    if name in ("pickle.loads", "pickle.load", "torch.load", "eval", "exec", "marshal.loads"):
                        calls.append((str(path.relative_to(REPO)), name))
                if isinstance(node, ast.ClassDef) and any(ast.unparse(b) == "pickle.Unpickler" for b in node.bases):
                    methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
                    unpicklers.append((str(path.relative_to(REPO)), node.name, "find_class" in methods))
    assert sorted(calls) == [("ckpt/state.py", "pickle.loads"), ("ckpt/state.py", "torch.load")]
    assert unpicklers == [("ckpt/dcp/metadata.py", "_AllowListUnpickler", True)]


@pytest.mark.parametrize("key", ["..", ".", "", "a/b", "../x", "/abs", "a\\b", "x\x00", "zarr.json", ".hidden"])
def test_escaping_tensor_names_are_refused_on_save_and_load(tmp_path, key):
    with pytest.raises(ckpt.CkptError):
        ckpt.save({key: torch.ones(2)}, str(tmp_path / "run"), step=1)
    with pytest.raises(ckpt.CkptError):
        ckpt.save({"model": {key: torch.ones(2)}}, str(tmp_path / "run"), step=1)
    assert not (tmp_path / "run" / fmt.step_dir(1) / fmt.META).exists()
    ckpt.save({"model": {"w": torch.ones(2)}}, str(tmp_path / "ok"), step=1)
    with pytest.raises(ckpt.CkptError):
        ckpt.load({"model": {key: torch.zeros(2)}}, str(tmp_path / "ok"))
    assert sorted(p.name for p in tmp_path.iterdir()) in (["ok"], ["ok", "run"])


def test_a_checkpoint_naming_tensors_outside_its_directory_is_refused_by_load_verify_and_cli(tmp_path):
    run = tmp_path / "inner" / "run"
    ckpt.save({"model": {"w": torch.ones(4)}}, str(run), step=1, layout="chunks")
    outside = tmp_path / "inner" / "victim"
    outside.mkdir()
    (outside / "zarr.json").write_text("{}")
    root = run / fmt.step_dir(1) / fmt.META
    doc = json.loads(root.read_text())
    doc["attributes"].pop(fmt.SEAL_KEY)
    evil = "../../victim"
    man = doc["attributes"]["ckpt"]
    man["arrays"][0]["path"] = evil
    doc["consolidated_metadata"]["metadata"][evil] = doc["consolidated_metadata"]["metadata"].pop("model/w")
    root.write_bytes(fmt.dumps(fmt.seal_root(doc)))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ckpt.FormatError, match="not a relative path inside the checkpoint"):
        ckpt.load({evil: torch.zeros(4)}, str(run), strict=False)
    with pytest.raises(ckpt.FormatError):
        ckpt.read_manifest(ckpt.open_storage(str(run)))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for argv, code in ((["verify", str(run)], 1), (["inspect", str(run)], 3),
                       (["export", str(run), str(out_dir / "x.safetensors")], 3),
                       (["reshard", str(run), "--to", "whole", str(out_dir / "re")], 3)):
        with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
            got = cli(argv)
        assert got == code, (argv, out.getvalue(), err.getvalue())
        assert "not a relative path inside the checkpoint" in out.getvalue() + err.getvalue()
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not p.is_relative_to(out_dir))
    assert after == [p for p in before if not (tmp_path / p).is_relative_to(out_dir)]
    assert list(out_dir.iterdir()) == []
    assert (outside / "zarr.json").read_text() == "{}"


# ---------------------------------------------------------------------------------------------
# The node agent


def _listening_inodes() -> dict[str, set[tuple[str, int]]]:
    """inode -> (local address, port) of every TCP socket in LISTEN state."""
    out: dict[str, set] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":
                continue
            addr, port = f[1].split(":")
            out.setdefault(f[9], set()).add((addr, int(port, 16)))
    return out


def _listening(pid: int) -> set[tuple[str, int]]:
    socks = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            socks.add(target[8:-1])
    table = _listening_inodes()
    return {a for inode in socks for a in table.get(inode, ())}


def _start_agent(tmp_path: Path, name: str, *extra: str) -> tuple[subprocess.Popen, dict]:
    d = tmp_path / name
    d.mkdir()
    ready = d / "ready.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # The log goes to a file: a pipe nobody reads fills up and blocks the daemon's next write.
    log = d / "agent.log"
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--socket", str(d / "a.sock"),
                              "--shm-prefix", f"sec{os.getpid()}{name}", "--memory-budget", "32MiB", "--ready-file",
                              str(ready), *extra], stdout=subprocess.DEVNULL, stderr=out, env=env, cwd=REPO)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert p.poll() is None, log.read_text(errors="replace")[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return p, json.loads(ready.read_text()) | {"socket": str(d / "a.sock")}


def _stop(p: subprocess.Popen) -> None:
    p.terminate()
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_agent_listens_on_nothing_but_its_socket_by_default_and_on_loopback_when_asked(tmp_path):
    a, info = _start_agent(tmp_path, "a")
    b, info_b = _start_agent(tmp_path, "b", "--peer-listen", "127.0.0.1:0", "--token-file",
                             str(_token(tmp_path)), "--metrics-listen", "127.0.0.1:0")
    try:
        assert _listening(a.pid) == set()  # no TCP at all
        assert stat.S_IMODE(os.stat(info["socket"]).st_mode) == 0o600
        got = _listening(b.pid)
        assert {port for _a, port in got} == {info_b["peer_port"], info_b["metrics_port"]}
        loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
        assert {addr for addr, _p in got} <= loopback  # 127.0.0.1 (or ::ffff:127.0.0.1, ::1) only
    finally:
        _stop(a)
        _stop(b)


def _token(tmp_path: Path) -> Path:
    t = tmp_path / "token"
    if not t.exists():
        t.write_text("s3cret-peer-token\n")
    return t


def test_agent_config_refuses_remote_binds_and_peers_without_a_token(tmp_path):
    from agent.config import AgentConfig
    from agent.errors import AgentConfigError

    sock = str(tmp_path / "s.sock")
    with pytest.raises(AgentConfigError):
        AgentConfig(socket_path=sock, peer_listen="127.0.0.1:7000")  # no token
    for addr in ("0.0.0.0:7000", "10.1.2.3:7000", "[::]:7000"):
        with pytest.raises(AgentConfigError):
            AgentConfig(socket_path=sock, peer_listen=addr, token="t")
        with pytest.raises(AgentConfigError):
            AgentConfig(socket_path=sock, metrics_listen=addr)
    AgentConfig(socket_path=sock, peer_listen="0.0.0.0:7000", token="t", allow_remote_bind=True)  # explicit only
    with pytest.raises(AgentConfigError):
        AgentConfig(socket_path=sock, socket_mode=0o666)


def test_agent_peers_must_authenticate_and_requests_are_bounded(tmp_path):
    from agent.pb import pb, rpc

    p, info = _start_agent(tmp_path, "p", "--peer-listen", "127.0.0.1:0", "--token-file", str(_token(tmp_path)))
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{info['peer_port']}",
                                   options=[("grpc.max_send_message_length", 64 << 20)])
        peer = rpc.PeerServiceStub(ch)
        good = (("authorization", "Bearer s3cret-peer-token"),)
        header = pb.ReplicaPart(header=pb.ReplicaHeader(
            key=pb.SnapshotKey(run_url=f"file://{tmp_path}/run", writer="rank00000", step=1), save_id="x",
            nbytes=1 << 20, plan_json="{}", writers=["rank00000"]))

        def code(fn):
            with pytest.raises(grpc.RpcError) as e:
                fn()
            return e.value.code()

        for md in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret-peer-token"),)):
            assert code(lambda: peer.ListSnapshots(pb.ListSnapshotsRequest(), metadata=md, timeout=10)) \
                == grpc.StatusCode.UNAUTHENTICATED
            assert code(lambda: peer.Replicate(iter([header]), metadata=md, timeout=10)) \
                == grpc.StatusCode.UNAUTHENTICATED
        # authenticated, but too large: a message over max_message_bytes, a replica over the budget
        big = pb.ListSnapshotsRequest(run_url="x" * (20 << 20))
        assert code(lambda: peer.ListSnapshots(big, metadata=good, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        huge = pb.ReplicaPart(header=pb.ReplicaHeader(key=header.header.key, save_id="x", nbytes=1 << 40,
                                                      plan_json="{}", writers=["rank00000"]))
        assert code(lambda: peer.Replicate(iter([huge]), metadata=good, timeout=10)) \
            == grpc.StatusCode.INVALID_ARGUMENT
        # a plan that lies about the bytes sent
        assert code(lambda: peer.Replicate(iter([header, pb.ReplicaPart(data=pb.SnapshotData(offset=0, data=b"x"))]),
                                           metadata=good, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
        assert peer.ListSnapshots(pb.ListSnapshotsRequest(), metadata=good, timeout=10).snapshots == []
        ch.close()
        assert p.poll() is None
    finally:
        _stop(p)
    assert p.returncode == 0


def test_peer_port_is_not_reachable_through_a_raw_socket_without_tls_handshake_crash(tmp_path):
    """Garbage bytes on the peer port do not take the agent down."""
    p, info = _start_agent(tmp_path, "g", "--peer-listen", "127.0.0.1:0", "--token-file", str(_token(tmp_path)))
    try:
        for blob in (b"\x00" * 64, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", os.urandom(4096)):
            with socket.create_connection(("127.0.0.1", info["peer_port"]), timeout=5) as s:
                s.sendall(blob)
                with contextlib.suppress(OSError):
                    s.recv(100)
        from agent.trainer.client import AgentClient

        with AgentClient(f"unix://{info['socket']}") as c:
            assert c.status().state == "serving"
    finally:
        _stop(p)
    assert p.returncode == 0
