"""Session revocation: a per-account "sessions issued before this are void" mark.

Marks live in storage (meta keys), so every worker and every node sharing the database
honours a logout or a password change; each process mirrors them in memory and
refreshes the mirror every `refresh_s`, so checking a session never waits on storage
(a revocation reaches other processes within that interval; this one at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from qpq_server.auth.sessions import Session
from qpq_server.errors import InvalidSession, QpqError
from qpq_server.storage.base import Storage

__all__ = ["REVOCATION_PREFIX", "SessionRevocations"]

REVOCATION_PREFIX = "sessions_not_before:"

log = logging.getLogger("qpq.sessions")


class SessionRevocations:
    def __init__(self, storage: Storage, clock: Callable[[], float] = time.time,
                 refresh_s: float = 2.0) -> None:
        self._storage = storage
        self._clock = clock
        self._refresh_s = refresh_s
        self._not_before: dict[str, float] = {}

    async def load(self) -> None:
        stored = await self._storage.meta_with_prefix(REVOCATION_PREFIX)
        for key, value in stored.items():
            user = key[len(REVOCATION_PREFIX):]
            self._not_before[user] = max(float(value), self._not_before.get(user, 0.0))

    async def run(self) -> None:
        """Refresh the mirror until cancelled (other processes' revocations)."""
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.load()
            except QpqError as exc:  # storage away for a moment: keep the last mirror
                log.warning("session revocation refresh failed", extra={"error": str(exc)})

    def check(self, session: Session) -> None:
        if session.issued_at < self._not_before.get(session.username, 0.0):
            raise InvalidSession("session was revoked (logout or password change); "
                                 "log in again")
        # USER#DEVICE: one device's sessions ("USER#": those bound to none), ended
        # by unlinking that device
        if session.issued_at < self._not_before.get(f"{session.username}#{session.device}",
                                                    0.0):
            raise InvalidSession("session was revoked (its device was unlinked)")

    async def revoke(self, username: str) -> float:
        """Void every session of `username` issued until now; returns the mark."""
        mark = self._clock()
        await self._storage.set_meta(REVOCATION_PREFIX + username, repr(mark))
        self._not_before[username] = mark
        return mark
