"""The commit relay (``agent.trainer.relay``): a notice its agent does not take is said once as a
warning (the agent then polls storage, and its commits come later), counted, and the relay goes
on with the saves after it."""

from __future__ import annotations

import logging
import threading
import time

import grpc

from agent.trainer.relay import CommitRelay
from ckpt.signals import OK


class _Signals:
    """Every commit waited for has happened."""

    def wait_committed(self, save: str, *, timeout_s: float, stop: threading.Event | None = None) -> str:
        return OK

    def wake(self, save: str) -> None:
        pass


class _Refused(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


def test_a_refused_notice_is_a_warning_once_and_the_relay_goes_on(caplog):
    told: list[int] = []

    def tell(step: int, save_id: str) -> None:
        if step < 3:
            raise _Refused()
        told.append(step)

    relay = CommitRelay(_Signals(), tell, timeout_s=5.0)  # type: ignore[arg-type]
    try:
        with caplog.at_level(logging.DEBUG, logger="agent.trainer.relay"):
            for step in (1, 2, 3):
                relay.expect(step, f"save-{step}")
            deadline = time.monotonic() + 10
            while relay.told < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        relay.close()
    assert told == [3] and relay.told == 1 and relay.failed_notices == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "UNAVAILABLE" in warnings[0].getMessage() and "polls storage" in warnings[0].getMessage()
