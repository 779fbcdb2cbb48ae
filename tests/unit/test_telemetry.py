"""The Checkpointer's Prometheus metrics and OpenTelemetry spans."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

import ckpt
from ckpt.storage import LocalStorage
from ckpt.telemetry import CheckpointerMetrics, Telemetry
from tests.helpers import DelegatingStorage


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    v = registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def job() -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, {"model": model, "optim": opt}


def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    opt.zero_grad()


class FakeSpan:
    def __init__(self, name: str, attributes: dict) -> None:
        self.name, self.attributes, self.events, self.ended, self.status = name, dict(attributes), [], False, None

    def add_event(self, name: str) -> None:
        self.events.append(name)

    def set_attribute(self, key: str, value: object) -> None:
        self.attributes[key] = value

    def record_exception(self, error: BaseException) -> None:
        self.events.append(f"exception {type(error).__name__}")

    def set_status(self, status: object) -> None:
        self.status = status

    def end(self) -> None:
        assert not self.ended
        self.ended = True


class FakeTracer:
    def __init__(self) -> None:
        self.spans: list[FakeSpan] = []

    def start_span(self, name: str, *, start_time: int, attributes: dict) -> FakeSpan:
        assert start_time > 0
        self.spans.append(FakeSpan(name, attributes))
        return self.spans[-1]


def test_checkpoints_and_restores_are_counted_in_the_registry_given(tmp_path):
    reg = CollectorRegistry()
    model, opt, state = job()
    step(model, opt)
    with ckpt.Checkpointer(str(tmp_path), every_n_steps=2, keep_last=None, metrics=reg) as ck:
        ck.attach(opt)
        handles = []
        for s in range(6):
            step(model, opt)
            if (h := ck.save(s, state)) is not None:
                handles.append(h)
        ck.wait()
    nbytes = sum(h.nbytes for h in handles)
    assert len(handles) == 3 and nbytes > 0
    assert value(reg, "ckpt_checkpoints_total", outcome="taken") == 3
    assert value(reg, "ckpt_checkpoints_total", outcome="committed") == 3
    assert value(reg, "ckpt_checkpoints_total", outcome="failed") == 0
    assert value(reg, "ckpt_save_stall_seconds_count") == 3
    assert value(reg, "ckpt_save_stall_seconds_sum") == pytest.approx(sum(h.stall_s for h in handles))
    for state_name in ("staged", "persisted", "committed"):
        assert value(reg, "ckpt_checkpoint_latency_seconds_count", state=state_name) == 3
        assert value(reg, "ckpt_checkpoint_bytes_total", state=state_name) == nbytes
    assert value(reg, "ckpt_last_committed_step") == 4
    assert value(reg, "ckpt_checkpoint_failures_total", stage="persist") == 0

    model2, opt2, state2 = job()
    step(model2, opt2)
    with ckpt.Checkpointer(str(tmp_path), metrics=reg) as ck:  # the same registry: the same series
        assert ck.restore(state2) == 5
        served = ck.last_restore.served
    assert value(reg, "ckpt_restore_seconds_count") == 1
    assert value(reg, "ckpt_restore_bytes_total", tier="storage") == sum(served.values()) > 0


class BrokenChunks(DelegatingStorage):
    def write(self, path, parts, *, durable=True):
        if "/.packs/" in path or "/c/" in path:
            raise PermissionError(f"denied: {path}")
        self.inner.write(path, parts, durable=durable)


def test_a_failed_checkpoint_is_counted_by_the_stage_that_failed_and_its_span_says_error(tmp_path):
    reg, tracer = CollectorRegistry(), FakeTracer()
    model, opt, state = job()
    step(model, opt)
    ck = ckpt.Checkpointer(BrokenChunks(LocalStorage(str(tmp_path))), every_n_steps=1, metrics=reg)
    ck.telemetry = Telemetry(ck.telemetry.metrics, tracer=tracer)
    try:
        h = ck.save(0, state)
        with pytest.raises(PermissionError):
            h.result(timeout=60)
    finally:
        ck.close()
    assert value(reg, "ckpt_checkpoints_total", outcome="failed") == 1
    assert value(reg, "ckpt_checkpoints_total", outcome="committed") == 0
    assert value(reg, "ckpt_checkpoint_failures_total", stage="persist") == 1
    assert value(reg, "ckpt_checkpoint_latency_seconds_count", state="staged") == 1
    assert value(reg, "ckpt_checkpoint_latency_seconds_count", state="persisted") == 0
    (span,) = tracer.spans
    assert span.name == "ckpt.save" and span.ended and span.events[0] == "staged"
    assert "exception PermissionError" in span.events and span.status is not None


def test_spans_follow_a_save_to_its_commit_and_a_restore(tmp_path):
    tracer = FakeTracer()
    model, opt, state = job()
    step(model, opt)
    with ckpt.Checkpointer(str(tmp_path), every_n_steps=1, metrics=False) as ck:
        assert ck.telemetry.metrics is None
        ck.telemetry = Telemetry(False, tracer=tracer)
        ck.attach(opt)
        h = ck.save(7, state)
        step(model, opt)  # the step hook waits for staging
        h.result(timeout=60)
    with ckpt.Checkpointer(str(tmp_path), metrics=False) as ck:
        ck.telemetry = Telemetry(False, tracer=tracer)
        ck.restore(job()[2])
    save, restore = tracer.spans
    assert save.name == "ckpt.save" and save.ended and save.events == ["staged", "persisted"]
    assert save.attributes["ckpt.step"] == 7 and save.attributes["ckpt.bytes"] == h.nbytes
    assert save.status is None and "ckpt.hook_stall_s" in save.attributes
    assert restore.name == "ckpt.restore" and restore.ended and restore.attributes["ckpt.step"] == 7
    assert restore.attributes["ckpt.bytes.storage"] > 0


def test_the_opentelemetry_api_without_an_sdk_is_a_no_op(tmp_path):
    pytest.importorskip("opentelemetry")
    tel = Telemetry(False)
    assert tel.tracer is not None  # the API's default tracer: records nothing, costs nothing
    state = job()[2]
    with ckpt.Checkpointer(str(tmp_path), every_n_steps=1, metrics=False) as ck:
        ck.telemetry = tel
        ck.save(0, state).result(timeout=60)


def test_metrics_in_the_default_registry_are_shared_by_every_checkpointer_of_the_process(tmp_path):
    from prometheus_client import REGISTRY

    a, b = Telemetry(True), Telemetry(True)
    assert a.metrics is b.metrics is CheckpointerMetrics.shared()
    assert a.metrics.registry is REGISTRY
    before = value(REGISTRY, "ckpt_checkpoints_total", outcome="taken")
    state = job()[2]
    with ckpt.Checkpointer(str(tmp_path / "a"), every_n_steps=1) as c1, \
            ckpt.Checkpointer(str(tmp_path / "b"), every_n_steps=1) as c2:
        c1.save(0, state)
        c2.save(0, state)
    assert value(REGISTRY, "ckpt_checkpoints_total", outcome="taken") == before + 2


def test_a_bad_metrics_setting_is_refused(tmp_path):
    with pytest.raises(ValueError, match="metrics"):
        ckpt.Checkpointer(str(tmp_path), metrics="prometheus")
