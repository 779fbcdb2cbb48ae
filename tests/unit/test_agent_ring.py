"""The agent's daemons in process, continued: the advertised port and a ring changed while
serving, restore from agent memory (exact; changed memory caught), a failed peer fetch falling
back to storage, the metrics endpoint, and replication over TLS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import ckpt
from agent.config import AgentConfig
from agent.errors import AgentConfigError
from agent.pb import pb
from tests.helpers import local_agent

REPO = Path(__file__).resolve().parents[2]


def test_port_zero_is_advertised_as_bound_and_the_ring_changes_while_serving(tmp_path):
    from agent.daemon import AgentDaemon

    base = {"memory_budget_bytes": 1 << 20, "shm_dir": str(tmp_path), "shm_prefix": "ringtest", "token": "t",
            "log_format": "text"}
    a = AgentDaemon(AgentConfig(socket_path=str(tmp_path / "a.sock"), peer_listen="127.0.0.1:0", **base))
    b = AgentDaemon(AgentConfig(socket_path=str(tmp_path / "b.sock"), peer_listen="127.0.0.1:0", **base))
    no_peers = AgentDaemon(AgentConfig(socket_path=str(tmp_path / "c.sock"), **base))
    a.start()
    b.start()
    no_peers.start()
    try:
        # port 0: the OS picked one; the agent advertises the port it bound, not 0
        assert a.config.self_address == f"127.0.0.1:{a.peer_port}" and a.peer_port > 0
        assert a.status().peer_address == a.config.self_address
        # serving peers: it can fetch from the ring, but replicates to nobody yet
        assert a.replicator is not None and no_peers.replicator is None and a.config.ring_successors() == []
        ring = [a.config.self_address, b.config.self_address]
        a.set_ring(ring, 1)
        assert a.config.ring_successors() == [b.config.self_address]
        assert a.agent.config is a.config and a.replicator is not None and a.replicator.config is a.config
        a.set_ring([a.config.self_address], 0)  # b's node is gone: nobody to replicate to
        assert a.config.ring_successors() == []
        with pytest.raises(AgentConfigError, match="must be in the ring"):
            a.set_ring([b.config.self_address, "127.0.0.1:9"], 1)
        with pytest.raises(AgentConfigError, match="need at least 3 agents"):
            a.set_ring(ring, 2)
        assert a.config.peers == (a.config.self_address,)  # a refused ring changes nothing
        with pytest.raises(AgentConfigError, match="does not serve peers"):
            no_peers.set_ring(ring, 1)
    finally:
        for d in (a, b, no_peers):
            d.stop()


def test_restore_from_agent_memory_is_exact_and_catches_changed_memory(tmp_path):
    """Chunks served from the agent's shared memory (read with pread, crc32c per block) are
    bit-exact, and a byte changed in the segment after the commit is a checksum error, not
    silently restored."""
    from ckpt.errors import CorruptCheckpointError

    with local_agent(tmp_path, "memtest") as (_, shm):
        g = torch.Generator().manual_seed(7)
        # a ragged last chunk and a bf16 tensor next to plain float32 ones
        state = {"a": torch.randn(3000, 700, generator=g), "b": torch.randn(17, 5, generator=g).bfloat16(),
                 "c": torch.arange(10_000, dtype=torch.int64)}
        run = tmp_path / "run"
        addr = f"unix://{tmp_path / 'a.sock'}"
        with ckpt.Checkpointer(str(run), agent=addr, max_chunk_bytes=1 << 20) as c:
            c.save(3, state, force=True).result(60)
        os.rename(run, tmp_path / "run.away")  # only the commit point and fragments come back
        run.mkdir()
        away = tmp_path / "run.away"
        for path in away.rglob("*"):
            rel = path.relative_to(away)
            if path.is_file() and (path.name == "zarr.json" or ".fragments" in rel.parts):
                (run / rel).parent.mkdir(parents=True, exist_ok=True)
                (run / rel).write_bytes(path.read_bytes())
        dest = {k: torch.zeros_like(v) for k, v in state.items()}
        with ckpt.Checkpointer(str(run), agent=addr) as c:
            mem = c.sink.restore_source(c.storage)
            assert mem.steps_in_memory == [3]
            assert len(mem._spans) == len(mem._chunks) > 3  # every chunk is read with pread
            asked = []
            mem._list_peers_fn = lambda: asked.append(1) or []
            c._restore_source = lambda step=None: mem
            assert c.restore(dest) == 4
        assert all(torch.equal(dest[k], state[k]) for k in state)
        assert asked == []  # every chunk was held here: the ring's agents were never asked

        (seg,) = [p for p in shm.iterdir() if p.name.startswith("memtest")]
        with open(seg, "r+b") as fh:
            fh.seek(4096)
            b = fh.read(1)
            fh.seek(4096)
            fh.write(bytes([b[0] ^ 0xFF]))
        with ckpt.Checkpointer(str(run), agent=addr) as c:
            with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
                c.restore({k: torch.zeros_like(v) for k, v in state.items()})


def test_a_failed_fetch_from_a_peer_falls_back_to_storage(tmp_path):
    """A snapshot only a peer holds is fetched on the first read of one of its chunks, once,
    whatever the number of reader threads; when the fetch fails, every chunk comes from storage
    and the restore is still exact."""
    from agent.trainer.memory import AgentMemoryStorage

    with local_agent(tmp_path, "fetchtest") as (_, shm):
        g = torch.Generator().manual_seed(3)
        state = {"a": torch.randn(1000, 700, generator=g), "b": torch.randn(300, 50, generator=g)}
        run = tmp_path / "run"
        addr = f"unix://{tmp_path / 'a.sock'}"
        with ckpt.Checkpointer(str(run), agent=addr, max_chunk_bytes=1 << 20) as c:
            c.save(2, state, force=True).result(60)
            (info,) = c.sink.client.list_snapshots(c.storage.url, with_plans=True)
            as_peer = pb.SnapshotInfo()
            as_peer.CopyFrom(info)
            as_peer.peer_address, as_peer.segment = "127.0.0.1:7460", ""
            calls = []

            def failing_fetch(i):
                calls.append(i.key.writer)
                raise ConnectionError("peer gone")

            for listed_now in (True, False):
                mem = AgentMemoryStorage(c.storage, [as_peer] if listed_now else [], str(shm), fetch=failing_fetch,
                                         list_peers=lambda writers: [as_peer])
                dest = {k: torch.zeros_like(v) for k, v in state.items()}
                c._restore_source = lambda step=None, mem=mem: mem
                assert c.restore(dest) == 3
                assert all(torch.equal(dest[k], state[k]) for k in state)
                assert mem.fetched_bytes == 0 and mem.served_bytes == 0
            assert calls == ["rank00000", "rank00000"]  # once per restore, not once per chunk


def test_metrics_endpoint_counts_what_a_save_did(tmp_path):
    """The Prometheus endpoint (loopback, port chosen by the OS) reports the bytes a save
    staged and persisted, one persist and one commit observed, and the memory held."""
    import urllib.request

    with local_agent(tmp_path, "metricstest", metrics_listen="127.0.0.1:0") as (daemon, _):
        state = {"w": torch.arange(300_000, dtype=torch.float32), "b": torch.ones(1000, dtype=torch.bfloat16)}
        with ckpt.Checkpointer(str(tmp_path / "run"), agent=f"unix://{tmp_path / 'a.sock'}") as c:
            handle = c.save(1, state, force=True)
            handle.result(60)
        nbytes = 300_000 * 4 + 1000 * 2
        assert daemon.metrics_port and daemon.metrics_port > 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10).read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        assert values["ckpt_agent_bytes_staged_total"] >= nbytes
        assert values["ckpt_agent_bytes_persisted_total"] == values["ckpt_agent_bytes_staged_total"]
        assert values["ckpt_agent_persist_seconds_count"] == 1
        assert values["ckpt_agent_commit_seconds_count"] == 1
        assert values["ckpt_agent_memory_budget_bytes"] == 64 << 20
        assert 0 < values["ckpt_agent_memory_used_bytes"] <= 64 << 20
        assert values['ckpt_agent_snapshots{state="committed"}'] == 1
        assert not any(k.startswith("ckpt_agent_failures_total") and v for k, v in values.items())


def _self_signed(tmp_path: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    import datetime
    import ipaddress

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ckpt-agent test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "agent.crt", tmp_path / "agent.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_replication_over_tls_and_a_plaintext_peer_is_refused(tmp_path):
    """Two agents with TLS (and the token) replicate a snapshot to each other; an agent that
    dials the same peer in plaintext gets nowhere (its replication fails, counted)."""
    import time

    from agent.daemon import AgentDaemon

    cert, key = _self_signed(tmp_path)
    shm = tmp_path / "shm"
    shm.mkdir()

    def daemon(name: str, **tls: str) -> AgentDaemon:
        d = AgentDaemon(AgentConfig(socket_path=str(tmp_path / f"{name}.sock"), memory_budget_bytes=64 << 20,
                                    shm_dir=str(shm), shm_prefix=f"tls{name}", log_format="text", token="s3cret",
                                    peer_listen="127.0.0.1:0", **tls))
        d.start()
        return d

    a = daemon("a", tls_cert=cert, tls_key=key, tls_ca=cert)
    b = daemon("b", tls_cert=cert, tls_key=key, tls_ca=cert)
    plain = daemon("p")
    try:
        ring = [a.config.self_address, b.config.self_address]
        a.set_ring(ring, 1)
        b.set_ring(ring, 1)
        plain.set_ring([plain.config.self_address, b.config.self_address], 1)
        state = {"w": torch.arange(50_000, dtype=torch.float32)}
        run = tmp_path / "run"
        with ckpt.Checkpointer(str(run), agent=f"unix://{tmp_path / 'a.sock'}") as c:
            c.save(1, state, force=True).result(60)
        deadline = time.monotonic() + 30
        while True:
            held = [(s.writer, s.state) for s in b.agent.snapshots() if s.replica]
            if held == [("rank00000", "committed")]:
                break
            assert time.monotonic() < deadline, held
            time.sleep(0.05)
        assert a.metrics.bytes_replicated._value.get() >= state["w"].numel() * 4
        with ckpt.Checkpointer(str(tmp_path / "run2"), agent=f"unix://{tmp_path / 'p.sock'}") as c:
            c.save(1, state, force=True).result(60)
        deadline = time.monotonic() + 30
        while plain.metrics.failures.labels("replicate")._value.get() < 1:
            assert time.monotonic() < deadline, "a plaintext peer was not refused"
            time.sleep(0.05)
        assert not [s for s in b.agent.snapshots() if s.replica and s.run_url.endswith("run2")]
    finally:
        for d in (a, b, plain):
            d.stop()
