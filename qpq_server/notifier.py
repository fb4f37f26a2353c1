"""Delivery notifier: wakes parked long-poll fetches when a message is enqueued.

In-process today; the interface is what a cross-process (or PostgreSQL LISTEN/NOTIFY)
notifier implements later.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable
from typing import Protocol

__all__ = ["DeliveryNotifier", "InProcessNotifier"]


class DeliveryNotifier(Protocol):
    def notify(self, recipients: Iterable[str]) -> None: ...

    async def wait(self, recipient: str, timeout: float) -> bool:
        """True when woken by a notify for recipient, False on timeout."""

    def wake_all(self) -> None:
        """Answer every parked waiter now (used when draining)."""


class InProcessNotifier:
    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)

    @property
    def waiting(self) -> int:
        return sum(len(v) for v in self._waiters.values())

    def notify(self, recipients: Iterable[str]) -> None:
        for recipient in recipients:
            for event in self._waiters.get(recipient, ()):
                event.set()

    async def wait(self, recipient: str, timeout: float) -> bool:
        event = asyncio.Event()
        self._waiters[recipient].add(event)
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            waiters = self._waiters.get(recipient)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[recipient]

    def wake_all(self) -> None:
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()
