"""Structured logs: one JSON object per line (or plain text), with the ``fields`` a call passes
in ``extra={"fields": {...}}``."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update({k: v for k, v in fields.items() if k not in doc})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            base += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return base


class BadRequestFilter(logging.Filter):
    """gRPC logs every request body it cannot parse as an ERROR with a full traceback, before
    any agent code runs: a client sending garbage in a loop turns into a log flood (and, with
    a slow or full log pipe, stalls the server thread that writes it). Keep one line, without
    the traceback, at most once per ``interval_s``, with the count of those suppressed."""

    def __init__(self, interval_s: float = 10.0, clock=time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "serializing" not in msg:  # "Exception deserializing request!", "... serializing response!"
            return True
        now = self._clock()
        if self._last is not None and now - self._last < self.interval_s:
            self.suppressed += 1
            return False
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = f"malformed request refused ({msg.rstrip('!')}; the client got INTERNAL)" + (
            f"; {self.suppressed} more since the last report" if self.suppressed else "")
        record.args, record.exc_info, record.exc_text = (), None, None
        self._last, self.suppressed = now, 0
        return True


def setup(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("grpc._common").addFilter(BadRequestFilter())
