"""What a peer may ask of us, once authenticated: deliver relays, look up keys, read
our key-transparency log. Authentication itself (`fed_hello`, `fed_auth`) is here too.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from cryptography import x509

from qpq_server.errors import (
    BadRequest,
    NotFound,
    RateLimited,
    RequestError,
    Unauthenticated,
    UnknownUser,
)
from qpq_server.federation.address import split_address
from qpq_server.federation.auth import auth_message, new_challenge, signature_valid
from qpq_server.federation.certs import Refusal, verify_peer_certificate
from qpq_server.federation.listener import PeerState
from qpq_server.federation.settings import FederationSettings
from qpq_server.metrics import ServerMetrics
from qpq_server.protocol import validate as v
from qpq_server.protocol.dispatch import ConnectionState, Handler
from qpq_server.ratelimit import RateLimiter
from qpq_server.storage.base import Storage

__all__ = ["Delivery", "InboundHandler"]

log = logging.getLogger("qpq.federation")

MAX_RELAYS_PER_BATCH = 1000
_MAX_PAYLOAD = 64 * 1024 * 1024
# A refused relay the origin should not retry, versus one to retry later (in order).
_PERMANENT = {"unknown_user", "forged_sender", "bad_request", "too_large"}


class Delivery(Protocol):
    """What the messaging service offers inbound relays and key lookups."""

    async def relay_mailboxes(self, recipient: str) -> list[str]:
        """The recipient's queues (one per device)."""

    async def check_relay_quotas(self, sender: str, mailboxes: list[str], size: int) -> None: ...

    def relayed(self, mailboxes: list[str]) -> None:
        """A relayed message was stored in these queues: count it, wake the devices."""

    async def keys_for(self, requester: str, username: str) -> dict[str, Any]: ...


class InboundHandler:
    def __init__(self, settings: FederationSettings, storage: Storage, metrics: ServerMetrics,
                 delivery: Delivery, kt_ops: Mapping[str, Handler],
                 peer_limiter: RateLimiter, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.storage = storage
        self.metrics = metrics
        self.delivery = delivery
        self.kt_ops = kt_ops
        self.peer_limiter = peer_limiter
        self.clock = clock
        self._ops: dict[str, Callable[[dict[str, Any], PeerState],
                                      Awaitable[dict[str, Any]]]] = {
            "relay": self._relay, "keys": self._keys, "kt": self._kt, "ping": self._ping}

    async def handle(self, request: dict[str, Any], state: PeerState) -> dict[str, Any]:
        op = request.get("op")
        if op == "fed_hello":
            state.challenge = new_challenge()
            return {"ok": True, "challenge": state.challenge, "domain": self.settings.domain}
        if op == "fed_auth":
            return self._auth(request, state)
        handler = self._ops.get(op) if isinstance(op, str) else None
        if handler is None:
            raise BadRequest(f"unknown federation operation {op!r}")
        if not state.authenticated:
            raise Unauthenticated("authenticate with fed_hello and fed_auth first")
        return {"ok": True, **await handler(request, state)}

    # -- authentication ----------------------------------------------------------------
    def _auth(self, request: dict[str, Any], state: PeerState) -> dict[str, Any]:
        claimed = v.get_str(request, "domain", max_len=253).lower()
        try:
            domain = self._verify(request, state, claimed)
        except Refusal as refusal:
            self.metrics.federation_refused_total.labels(reason=refusal.reason).inc()
            # The claimed name is printable and bounded (a DOMAIN_RE-free log injection
            # is harmless in structured logs); never the certificate or signature.
            log.warning("federation peer refused", extra={
                "reason": refusal.reason, "claimed_domain": claimed[:253],
                "source": state.source, "detail": refusal.detail})
            return {"ok": False, "error": {"code": "refused", "message":
                                           f"federation peer refused: {refusal.detail}"}}
        state.domain = domain
        log.info("federation peer authenticated", extra={"peer": domain,
                                                          "source": state.source})
        return {"ok": True, "domain": self.settings.domain}

    def _verify(self, request: dict[str, Any], state: PeerState, claimed: str) -> str:
        peer = self.settings.peers.get(claimed)
        if peer is None:
            raise Refusal("unknown_peer", f"{claimed!r} is not a configured peer")
        der = v.get_bytes(request, "certificate", max_len=8192)
        signature = v.get_bytes(request, "signature", max_len=256)
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise Refusal("bad_certificate", "certificate is not DER X.509") from None
        domain = verify_peer_certificate(cert, self.settings.cas,
                                         dt.datetime.fromtimestamp(self.clock(), dt.UTC))
        if domain != claimed:
            raise Refusal("wrong_domain", f"certificate is for {domain!r}, not {claimed!r}")
        if state.challenge is None or not signature_valid(
                cert, signature, auth_message(self.settings.domain, claimed, state.challenge)):
            raise Refusal("bad_signature", "the challenge signature does not verify with "
                          "the certificate's key")
        source = state.source.removeprefix("::ffff:")
        if peer.sources and source not in peer.sources:
            raise Refusal("wrong_address", f"{claimed!r} connected from {source}, not from "
                          "its configured address")
        return domain

    # -- relays ------------------------------------------------------------------------
    async def _relay(self, request: dict[str, Any], state: PeerState) -> dict[str, Any]:
        """Deliver in order; a sender whose relay must wait (quota, rate) has its later
        relays in this batch deferred too, so each sender's order holds."""
        origin = state.domain
        assert origin is not None
        items = request.get("relays")
        if not isinstance(items, list) or len(items) > MAX_RELAYS_PER_BATCH:
            raise BadRequest(f"'relays' must be a list of at most {MAX_RELAYS_PER_BATCH}")
        results: list[str] = []
        blocked: set[str] = set()
        for item in items:
            if not isinstance(item, dict):
                results.append("bad_request")
                continue
            sender = str(item.get("from", ""))
            if sender in blocked:
                results.append("deferred")
                continue
            result = await self._deliver_one(origin, item)
            if result not in ("delivered", "duplicate") and result not in _PERMANENT:
                blocked.add(sender)
            results.append(result)
            label = {"delivered": "received", "duplicate": "received_duplicate"}.get(
                result, "refused")
            self.metrics.federation_relay_total.labels(peer=origin, result=label).inc()
        return {"results": results}

    async def _deliver_one(self, origin: str, item: dict[str, Any]) -> str:
        try:
            relay_id = v.get_int(item, "id", lo=0, hi=2**63 - 1)
            payload = v.get_bytes(item, "payload", max_len=_MAX_PAYLOAD)
            recipient = v.get_username(item, "to")
            sender = v.get_str(item, "from", max_len=64 + 1 + 253)
            user, domain = split_address(sender, self.settings.domain)
            if domain != origin:
                log.warning("federation peer claimed a sender of another domain",
                            extra={"peer": origin, "sender_domain": domain or "(local)"})
                return "forged_sender"
            if not self.peer_limiter.allow(origin, self.clock()):
                self.metrics.rate_limit_hit_total.labels(scope="federation").inc()
                raise RateLimited(f"relays from {origin} exceed the peer rate limit")
            if not await self.storage.existing_users([recipient]):
                raise UnknownUser(f"no user {recipient!r}")
            mailboxes = await self.delivery.relay_mailboxes(recipient)
            await self.delivery.check_relay_quotas(f"{user}@{origin}", mailboxes,
                                                   len(payload))
            stored = await self.storage.enqueue_relayed(origin, relay_id, f"{user}@{origin}",
                                                        mailboxes, payload, self.clock())
        except RequestError as exc:  # quota and rate refusals too: retried in order later
            return exc.code
        if stored is None:
            return "duplicate"
        self.delivery.relayed(mailboxes)
        return "delivered"

    async def _ping(self, request: dict[str, Any], state: PeerState) -> dict[str, Any]:
        return {"time": self.clock()}

    # -- lookups -----------------------------------------------------------------------
    async def _keys(self, request: dict[str, Any], state: PeerState) -> dict[str, Any]:
        origin = state.domain
        requester = v.get_str(request, "requester", max_len=64 + 1 + 253)
        if split_address(requester, self.settings.domain)[1] != origin:
            raise BadRequest("'requester' must be a user of the asking peer's domain")
        if not self.peer_limiter.allow(f"keys:{origin}", self.clock()):
            self.metrics.rate_limit_hit_total.labels(scope="federation").inc()
            raise RateLimited(f"key lookups from {origin} exceed the peer rate limit")
        return await self.delivery.keys_for(requester, v.get_username(request))

    async def _kt(self, request: dict[str, Any], state: PeerState) -> dict[str, Any]:
        call = v.get_str(request, "call", max_len=32)
        handler = self.kt_ops.get(call)
        if handler is None:
            raise NotFound(f"no key-transparency operation {call!r}")
        fields = {k: val for k, val in request.items() if k not in ("op", "call")}
        answer = await handler(fields, ConnectionState(peer=f"federation:{state.domain}"))
        return dict(answer)
