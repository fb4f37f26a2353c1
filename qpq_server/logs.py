"""Structured JSON logs on stderr. Callers pass facts in `extra`; never secrets or payloads."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["JsonFormatter", "RepeatFilter", "setup_logging"]

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_FORBIDDEN = {"token", "password", "db_key", "payload", "session", "secret"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _FORBIDDEN:
                entry[key] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aioquic logs every connection at INFO; keep it quiet unless debugging.
    logging.getLogger("quic").setLevel(logging.WARNING if level != "debug" else logging.DEBUG)


class RepeatFilter(logging.Filter):
    """Rate-limits repeated records: at most `burst` of one (logger, message) per
    `window_s`, then one summary of how many were suppressed. A client that can make
    the server log (malformed requests, failed logins) cannot flood the disk with it."""

    def __init__(self, burst: int = 10, window_s: float = 60.0,
                 clock: Any = time.monotonic) -> None:
        super().__init__()
        self._burst = burst
        self._window_s = window_s
        self._clock = clock
        self._seen: dict[tuple[str, str], list[float]] = {}  # key -> [window start, count]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self._clock()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self._window_s:
            suppressed = int(entry[1]) - self._burst if entry else 0
            if len(self._seen) > 10_000:  # bounded: forget old keys
                self._seen.clear()
            self._seen[key] = [now, 1.0]
            if suppressed > 0:
                record.suppressed_before = suppressed
            return True
        entry[1] += 1
        return entry[1] <= self._burst
