"""PromQL-style durations (`14d`, `36h`, `1w`, `90m`) for `--lookback` and `--horizon`."""

from __future__ import annotations

import re

__all__ = ["DurationError", "format_duration", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400, "y": 365 * 86_400}
_PART = re.compile(r"(\d+)([smhdwy])")


class DurationError(ValueError):
    """Not a duration; the message says what is accepted."""


def parse_duration(text: str) -> int:
    """Seconds in `text`, e.g. '14d' -> 1209600, '1d12h' -> 129600; refuses 0 and junk."""
    raw = text.strip()
    parts = _PART.findall(raw)
    if not raw or "".join(n + u for n, u in parts) != raw:
        raise DurationError(
            f"{text!r} is not a duration; use a number and a unit (s, m, h, d, w, y), "
            "e.g. 14d or 36h"
        )
    seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise DurationError(f"{text!r} must be longer than 0")
    return seconds


def format_duration(seconds: float) -> str:
    """A short human duration: '14 d', '3.5 h', '20 min'."""
    if seconds >= 86_400:
        return f"{seconds / 86_400:.3g} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 60:.3g} min"
