"""Delivery wake-ups across nodes over PostgreSQL LISTEN/NOTIFY.

Each process holds one dedicated connection that LISTENs on the cluster's channel and
wakes its local waiters when a recipient's name arrives, and one that sends the NOTIFYs
(a connection blocked in `notifies()` cannot send). Local waiters are woken at once by
`notify`; our own NOTIFYs coming back are skipped by the sender's backend pid.

While the listening connection is down a wake-up can be missed, so on every (re)connect
all local waiters are woken: they re-read their mailbox, which costs one query each and
loses nothing. Reconnects back off; nothing polls.

Every listening connection (each worker of each node) receives every notification, so
a notification carries a whole burst of recipients, space-separated (names never hold
a space): under load one notification per burst per listener, not one per recipient.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg import AsyncConnection

from qpq_server.notifier import InProcessNotifier
from qpq_server.secrets import Secret
from qpq_server.storage.postgres import describe_pg_error

__all__ = ["PgNotifier", "channel_for"]

log = logging.getLogger("qpq.pgnotify")

_BACKOFF_MIN_S = 0.2
_BACKOFF_MAX_S = 2.0
_BATCH_MAX = 256
# PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more.
_PAYLOAD_MAX = 7_900


def channel_for(domain: str) -> str:
    """One channel per qpq cluster (its domain): clusters sharing a database stay apart."""
    return "qpq_deliver_" + hashlib.sha256(domain.encode()).hexdigest()[:16]


class PgNotifier:
    def __init__(self, dsn: Secret, channel: str, *, connect_timeout_s: float = 5.0) -> None:
        self._dsn = dsn
        self.channel = channel
        self._timeout = connect_timeout_s
        self._local = InProcessNotifier()
        self._outbox: asyncio.Queue[str] = asyncio.Queue()
        self._sender_pid: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = asyncio.Event()  # set while the LISTEN connection is up

    @property
    def connected(self) -> bool:
        """Both connections are up: wake-ups reach and leave this node (for /readyz)."""
        return self.listening.is_set() and self._sender_pid is not None

    @property
    def waiting(self) -> int:
        return self._local.waiting

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen_loop(), name="qpq-pg-listen"),
                       loop.create_task(self._send_loop(), name="qpq-pg-notify")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    # -- DeliveryNotifier --------------------------------------------------------------
    def notify(self, recipients: Iterable[str]) -> None:
        names = list(dict.fromkeys(recipients))
        self._local.notify(names)
        for name in names:
            self._outbox.put_nowait(name)

    async def wait(self, recipient: str, timeout: float) -> bool:
        return await self._local.wait(recipient, timeout)

    def wake_all(self) -> None:
        self._local.wake_all()

    # -- connections -------------------------------------------------------------------
    async def _connect(self) -> AsyncConnection[Any]:
        return await AsyncConnection.connect(self._dsn.reveal(), autocommit=True,
                                             connect_timeout=max(1, int(self._timeout)))

    async def _connect_sender(self) -> AsyncConnection[Any]:
        conn = await self._connect()
        # A NOTIFY is a transaction of its own (PostgreSQL gives it a transaction id),
        # so with the default synchronous_commit each burst waited for a WAL flush. A
        # wake-up is a hint that is not worth a flush: the message it announces was
        # committed, durably, before it was sent; NOTIFY is delivered at commit anyway.
        await conn.execute("SET synchronous_commit = off")
        return conn

    def _report(self, what: str, exc: BaseException) -> None:
        log.warning(f"PostgreSQL {what} connection lost; reconnecting",
                    extra={"error": describe_pg_error(exc, self._dsn.reveal())})

    async def _listen_loop(self) -> None:
        backoff = _BACKOFF_MIN_S
        while True:
            try:
                async with await self._connect() as conn:
                    await conn.execute(f'LISTEN "{self.channel}"')
                    self.listening.set()
                    backoff = _BACKOFF_MIN_S
                    # Anything sent while we were not listening is lost: re-check all.
                    self._local.wake_all()
                    async for note in conn.notifies():
                        if note.pid != self._sender_pid:
                            self._local.notify(note.payload.split(" "))
            except (psycopg.Error, OSError) as exc:
                self._report("LISTEN", exc)
            self.listening.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def _send_loop(self) -> None:
        backoff = _BACKOFF_MIN_S
        pending: list[str] = []
        while True:
            try:
                async with await self._connect_sender() as conn:
                    self._sender_pid = conn.info.backend_pid
                    backoff = _BACKOFF_MIN_S
                    while True:
                        if not pending:
                            pending = await self._next_batch()
                        # One statement (one round trip, one commit) for a burst of
                        # enqueues, its names in as few notifications as fit.
                        await conn.execute("SELECT pg_notify(%s, p) FROM unnest(%s::text[])"
                                           " AS p", (self.channel, payloads(pending)))
                        pending = []
            except (psycopg.Error, OSError) as exc:
                self._report("NOTIFY", exc)
            self._sender_pid = None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def _next_batch(self) -> list[str]:
        """Wait for a name, then take what else is queued (each name once)."""
        names = {await self._outbox.get(): None}
        while len(names) < _BATCH_MAX and not self._outbox.empty():
            names[self._outbox.get_nowait()] = None
        return list(names)


def payloads(names: list[str]) -> list[str]:
    """The names joined by spaces into notification payloads under PostgreSQL's limit."""
    out: list[str] = []
    current: list[str] = []
    size = 0
    for name in names:
        length = len(name.encode()) + 1
        if current and size + length > _PAYLOAD_MAX:
            out.append(" ".join(current))
            current, size = [], 0
        current.append(name)
        size += length
    if current:
        out.append(" ".join(current))
    return out
