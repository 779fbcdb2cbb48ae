"""Fuzz the node agent's gRPC API (hypothesis, bounded) against a real ``ckpt-agent`` daemon
on a Unix socket (and its peer port on loopback): random field values in every request of
the trainer, admin and peer services, some with a real session and real segments so they
get past the first checks, and raw bytes that are not a protobuf at all. Every call ends OK
or with one of the documented status codes, never INTERNAL/UNKNOWN; the daemon keeps
serving and is stopped clean at the end."""

from __future__ import annotations

import os
import sys

import grpc
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from .test_security import _start_agent, _stop, _token

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm") or not sys.platform.startswith("linux"),
                                reason="needs Linux POSIX shared memory")

EXAMPLES = int(os.environ.get("CKPT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

DOCUMENTED = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
              grpc.StatusCode.UNAUTHENTICATED}
TOKEN = (("authorization", "Bearer s3cret-peer-token"),)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agentfuzz")
    proc, info = _start_agent(tmp, "fz", "--peer-listen", "127.0.0.1:0", "--token-file", str(_token(tmp)),
                              "--drain-timeout", "5")
    from agent.pb import pb
    from agent.trainer.client import AgentClient

    client = AgentClient(f"unix://{info['socket']}")
    run = f"file://{tmp}/run"
    events = client.register(pb.RegisterRequest(run_url=run, writer="rank00000"))
    sid = next(events).registered.session_id
    segments = [client.lease(sid, 1 << 16).segment for _ in range(2)]
    peer_channel = grpc.insecure_channel(f"127.0.0.1:{info['peer_port']}")
    ctx = {"proc": proc, "client": client, "sid": sid, "segments": segments, "run": run, "tmp": tmp,
           "peer": peer_channel, "calls": 0}
    yield ctx
    events.cancel()
    peer_channel.close()
    client.close()
    _stop(proc)
    assert proc.returncode == 0
    prefix = f"sec{os.getpid()}fz."
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


def _value(field, data, ctx, depth):
    from google.protobuf.descriptor import FieldDescriptor as F

    name = field.name
    if field.type == F.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            return None
        return _message(field.message_type._concrete_class, data, ctx, depth + 1) if depth < 3 else None
    if field.type == F.TYPE_STRING:
        known = {"session_id": [ctx["sid"]], "segment": ctx["segments"], "run_url": [ctx["run"]],
                 "writer": ["rank00000", "rank00001"], "save_id": ["s1"],
                 "plan_json": ['{"version":1,"arrays":[],"metadata":[],"values":{},"tensors":[],"requests":[]}',
                               '{"version":1}', "[]", "{"]}.get(name, [])
        return data.draw(st.sampled_from(known) | st.text(max_size=40) if known else st.text(max_size=40))
    if field.type == F.TYPE_BYTES:
        return data.draw(st.binary(max_size=64))
    if field.type == F.TYPE_BOOL:
        return data.draw(st.booleans())
    if field.type == F.TYPE_ENUM:
        return data.draw(st.sampled_from([v.number for v in field.enum_type.values]))
    if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return data.draw(st.floats(allow_nan=True, allow_infinity=True, width=32 if field.type == F.TYPE_FLOAT else 64))
    signed = field.type in (F.TYPE_INT32, F.TYPE_INT64, F.TYPE_SINT32, F.TYPE_SINT64, F.TYPE_SFIXED32,
                            F.TYPE_SFIXED64)
    bits = 32 if field.type in (F.TYPE_INT32, F.TYPE_UINT32, F.TYPE_SINT32, F.TYPE_FIXED32, F.TYPE_SFIXED32) else 64
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return data.draw(st.sampled_from([0, 1, 5, 1 << 16, 1 << 20, hi, lo]) | st.integers(lo, hi))


def _message(cls, data, ctx, depth=0):
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        if not data.draw(st.booleans()):
            continue
        if field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                target = getattr(msg, field.name)
                for _ in range(data.draw(st.integers(0, 2))):
                    target[data.draw(st.text(max_size=6))] = data.draw(st.text(max_size=6))
                continue
            for _ in range(data.draw(st.integers(0, 3))):
                v = _value(field, data, ctx, depth)
                if v is None:
                    continue
                if field.message_type is not None:
                    getattr(msg, field.name).add().CopyFrom(v)
                else:
                    getattr(msg, field.name).append(v)
            continue
        v = _value(field, data, ctx, depth)
        if v is None:
            continue
        if field.message_type is not None:
            getattr(msg, field.name).CopyFrom(v)
        else:
            setattr(msg, field.name, v)
    return msg


def _methods():
    from agent.pb import rpc  # noqa: F401 - registers the services

    from agent._proto.ckpt.agent.v1 import agent_pb2

    out = []
    for svc in agent_pb2.DESCRIPTOR.services_by_name.values():
        for m in svc.methods:
            if m.name == "Drain":
                continue  # draining refuses everything after it: fuzzed separately below
            out.append((svc.full_name, m))
    return out


METHODS = _methods()


def _call(ctx, service, method, request_bytes):
    peer = service.endswith("PeerService")
    channel = ctx["peer"] if peer else ctx["client"].channel
    path = f"/{service}/{method.name}"
    md = TOKEN if peer else ()
    ident = lambda b: b  # noqa: E731
    resp_cls = method.output_type._concrete_class
    if method.client_streaming and not method.server_streaming:
        fn = channel.stream_unary(path, request_serializer=ident, response_deserializer=resp_cls.FromString)
        return fn(iter(request_bytes), metadata=md, timeout=10)
    if method.server_streaming:
        fn = channel.unary_stream(path, request_serializer=ident, response_deserializer=resp_cls.FromString)
        call = fn(request_bytes[0], metadata=md, timeout=10)
        try:
            next(call, None)  # Register streams for the session's whole life: its first event is the answer
        finally:
            call.cancel()
        return None
    fn = channel.unary_unary(path, request_serializer=ident, response_deserializer=resp_cls.FromString)
    return fn(request_bytes[0], metadata=md, timeout=10)


def _check(ctx, fn):
    ctx["calls"] += 1
    try:
        fn()
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.CANCELLED:  # our own cancel of a stream
            return
        assert code in DOCUMENTED, (code, e.details())
    assert ctx["proc"].poll() is None, "the agent died"
    from agent.pb import pb

    # and it still answers, at once
    ctx["client"].admin.GetAgentStatus(pb.GetAgentStatusRequest(), timeout=5)


@FUZZ
@given(st.data())
def test_random_requests_get_documented_status_codes(daemon, data):
    service, method = data.draw(st.sampled_from(METHODS))
    cls = method.input_type._concrete_class
    n = data.draw(st.integers(1, 3)) if method.client_streaming else 1
    msgs = [_message(cls, data, daemon) for _ in range(n)]
    note(f"{method.name}: {msgs}")
    _check(daemon, lambda: _call(daemon, service, method, [m.SerializeToString() for m in msgs]))


@FUZZ
@given(st.data())
def test_bytes_that_are_not_protobuf_never_crash_the_agent(daemon, data):
    service, method = data.draw(st.sampled_from(METHODS))
    blob = data.draw(st.binary(min_size=1, max_size=200))
    try:
        _call(daemon, service, method, [blob])
    except grpc.RpcError as e:
        # gRPC's own answer to a body it cannot parse is INTERNAL "Exception deserializing
        # request!", before any agent code runs; anything the agent answers is documented.
        assert e.code() in DOCUMENTED | {grpc.StatusCode.CANCELLED} or (
            e.code() == grpc.StatusCode.INTERNAL and "deserializ" in (e.details() or "")), (e.code(), e.details())
    assert daemon["proc"].poll() is None
    from agent.pb import pb

    assert daemon["client"].status().state == "serving"
    assert daemon["client"].trainer.ListSnapshots(pb.ListSnapshotsRequest(), timeout=10) is not None
