"""A heartbeat on the event loop, so `/readyz` (served from another thread) can tell a
live loop from a wedged one: a stuck loop stops beating and readiness goes false."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["LoopHeartbeat"]


class LoopHeartbeat:
    def __init__(self, interval_s: float = 0.5, stale_after_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._stale_after_s = stale_after_s
        self._clock = clock
        self._last: float | None = None

    async def run(self) -> None:
        """Beat until cancelled."""
        while True:
            self._last = self._clock()
            await asyncio.sleep(self._interval_s)

    def alive(self) -> bool:
        """True when the loop beat within `stale_after_s` (any thread may ask)."""
        last = self._last
        return last is not None and self._clock() - last <= self._stale_after_s
