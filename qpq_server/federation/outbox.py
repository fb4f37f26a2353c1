"""The durable outbound queue of one peer and the task that relays it.

The queue is the mailbox `@fed:PEER` of the ordinary message store (see `address`), so
it survives restarts on every backend. Each entry's message id is its relay id: the
peer records it with the message in one commit, so a retry after a lost answer is
answered `duplicate`, never delivered twice. Entries are relayed oldest first and an
entry that must wait (peer away, rate limit, quota) keeps its sender's later entries
waiting too, so each sender's order holds. An entry older than `relay_max_age_s` is
dropped and counted as `expired`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

from qpq_server.errors import QpqError
from qpq_server.federation.address import outbox_mailbox
from qpq_server.federation.link import LinkError, PeerLink
from qpq_server.federation.settings import FederationSettings, Peer
from qpq_server.metrics import ServerMetrics
from qpq_server.storage.base import Storage, StoredMessage

__all__ = ["Relayer", "backoff_delay", "pack_entry"]

log = logging.getLogger("qpq.federation")

BATCH = 200
BATCH_BYTES = 4 * 1024 * 1024
RELAY_TIMEOUT_S = 60.0  # a batch of BATCH_BYTES over a slow link
_PERMANENT = {"unknown_user", "forged_sender", "bad_request", "too_large"}


def backoff_delay(failures: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential from `base_s` up to `max_s`, drawn from the upper half of that
    ceiling, so servers retrying one recovered peer do not do it in lockstep."""
    ceiling = min(max_s, base_s * 2.0 ** min(max(failures - 1, 0), 30))
    return ceiling * rng.uniform(0.5, 1.0)


def pack_entry(recipient: str, payload: bytes) -> bytes:
    return bytes(msgpack.packb({"to": recipient, "payload": payload}, use_bin_type=True))


def _unpack_entry(data: bytes) -> dict[str, Any]:
    value = msgpack.unpackb(data, raw=False)
    if not isinstance(value, dict):
        raise ValueError("outbox entry is not a map")
    return value


class Relayer:
    def __init__(self, peer: Peer, settings: FederationSettings, storage: Storage,
                 metrics: ServerMetrics, link: Callable[[str], Awaitable[PeerLink]],
                 on_removed: Callable[[int], None], clock: Callable[[], float],
                 poll_interval_s: float, probe_interval_s: float,
                 rng: random.Random | None = None) -> None:
        self.peer = peer
        self.settings = settings
        self.storage = storage
        self.metrics = metrics
        self._link = link
        self._on_removed = on_removed  # the service's delivery-queue depth
        self.clock = clock
        self.poll_interval_s = poll_interval_s
        self.probe_interval_s = probe_interval_s
        self._last_contact = float("-inf")  # last relay or probe: probe at once
        self.mailbox = outbox_mailbox(peer.domain)
        self._wake = asyncio.Event()
        self._failures = 0
        self._rng = rng or random.Random()  # jitter only: not a secret

    def wake(self) -> None:
        self._wake.set()

    def _count(self, result: str, n: int = 1) -> None:
        if n:
            self.metrics.federation_relay_total.labels(peer=self.peer.domain,
                                                       result=result).inc(n)

    async def run(self) -> None:
        while True:
            try:
                delay = await self.relay_once()
            except QpqError as exc:  # storage away: try again later
                log.error("federation outbox unavailable", extra={
                    "peer": self.peer.domain, "error": str(exc)})
                delay = self.poll_interval_s
            except Exception:  # a bug must not stop this peer's relaying for good
                log.exception("federation relayer failed; retrying",
                              extra={"peer": self.peer.domain})
                delay = self.settings.retry_max_s
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            self._wake.clear()

    def _backoff(self) -> float:
        s = self.settings
        return backoff_delay(self._failures, s.retry_base_s, s.retry_max_s, self._rng)

    async def relay_once(self) -> float:
        """One round; returns how long to wait before the next (0: go on at once)."""
        self.metrics.federation_queue_depth.labels(peer=self.peer.domain).set(
            await self.storage.mailbox_count(self.mailbox))
        entries = await self.storage.fetch(self.mailbox, BATCH, BATCH_BYTES)
        if not entries:
            await self._probe()
            return self.poll_interval_s
        entries = await self._drop_expired(entries)
        if not entries:
            return 0.0
        relays, unreadable = [], []
        for entry in entries:
            try:
                body = _unpack_entry(entry.payload)
                relays.append({"id": entry.id, "to": str(body["to"]),
                               "from": f"{entry.sender}@{self.settings.domain}",
                               "payload": bytes(body["payload"])})
            except (ValueError, KeyError, TypeError):
                unreadable.append(entry)
        if unreadable:  # written by this code, so only by a bug or a damaged store
            await self._remove([e.id for e in unreadable])
            self._count("rejected", len(unreadable))
            log.error("unreadable federation outbox entries dropped", extra={
                "peer": self.peer.domain, "count": len(unreadable)})
            return 0.0
        try:
            link = await self._link(self.peer.domain)
            answer = await link.call("relay", timeout=RELAY_TIMEOUT_S, relays=relays)
        except LinkError as exc:
            self._failures += 1
            self.metrics.federation_peer_up.labels(peer=self.peer.domain).set(0)
            self._count("retry", len(relays))
            delay = self._backoff()
            log.warning("federation relay failed; will retry", extra={
                "peer": self.peer.domain, "code": exc.code, "error": str(exc),
                "queued": len(relays), "retry_in_s": round(delay, 1)})
            return delay
        self._failures = 0
        self._last_contact = self.clock()
        self.metrics.federation_peer_up.labels(peer=self.peer.domain).set(1)
        return await self._settle(entries, list(answer.get("results") or []))

    async def _probe(self) -> None:
        """With nothing to relay, still find out now and then whether the peer answers:
        peer_up must not read "down" for a peer that is only quiet, nor "up" for one
        that went away since the last relay."""
        now = self.clock()
        if now - self._last_contact < self.probe_interval_s:
            return
        self._last_contact = now
        try:
            await (await self._link(self.peer.domain)).call("ping")
        except LinkError as exc:
            self.metrics.federation_peer_up.labels(peer=self.peer.domain).set(0)
            log.warning("federation peer unreachable", extra={
                "peer": self.peer.domain, "code": exc.code, "error": str(exc)})
            return
        self.metrics.federation_peer_up.labels(peer=self.peer.domain).set(1)

    async def _drop_expired(self, entries: list[StoredMessage]) -> list[StoredMessage]:
        oldest = self.clock() - self.settings.relay_max_age_s
        expired = [e for e in entries if e.sent_at < oldest]
        if expired:
            await self._remove([e.id for e in expired])
            self._count("expired", len(expired))
            log.warning("federation relays expired undelivered", extra={
                "peer": self.peer.domain, "count": len(expired),
                "max_age_s": self.settings.relay_max_age_s})
        return [e for e in entries if e.sent_at >= oldest]

    async def _settle(self, entries: list[StoredMessage], results: list[Any]) -> float:
        done: list[int] = []
        waiting = 0
        for entry, result in zip(entries, results, strict=False):
            if result in ("delivered", "duplicate"):
                done.append(entry.id)
                self._count("sent" if result == "delivered" else "sent_duplicate")
            elif result in _PERMANENT:
                done.append(entry.id)
                self._count("rejected")
                log.warning("federation peer rejected a relay", extra={
                    "peer": self.peer.domain, "reason": str(result), "relay_id": entry.id})
            else:  # deferred, rate limited, quota: retried in order
                waiting += 1
        waiting += max(0, len(entries) - len(results))
        await self._remove(done)
        if waiting:
            self._count("retry", waiting)
            self._failures += 1
            return self._backoff()
        return 0.0

    async def _remove(self, ids: list[int]) -> None:
        if ids:
            removed = await self.storage.ack(self.mailbox, ids)
            self._on_removed(removed)
