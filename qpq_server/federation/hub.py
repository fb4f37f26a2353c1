"""The federation as the rest of the server sees it: routing `user@domain` recipients to
per-peer outboxes, remote key and log lookups through the peer, the listener, and the
relayers. Built by `qpq-server run` when `[federation] enabled = true`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from qpq_server.config import Config, parse_hostport
from qpq_server.errors import (
    BadRequest,
    ConfigError,
    NotFound,
    QpqError,
    QuotaExceeded,
    RateLimited,
    RequestError,
    ServerBusy,
    UnknownUser,
)
from qpq_server.federation.address import outbox_mailbox, split_address
from qpq_server.federation.inbound import Delivery, InboundHandler
from qpq_server.federation.link import LinkError, PeerLink, open_link
from qpq_server.federation.listener import FederationListener
from qpq_server.federation.outbox import Relayer, pack_entry
from qpq_server.federation.settings import FederationSettings, load_settings
from qpq_server.metrics import ServerMetrics
from qpq_server.protocol.dispatch import ConnectionState, Handler
from qpq_server.ratelimit import RateLimiter
from qpq_server.storage.base import Storage

__all__ = ["Federation"]

log = logging.getLogger("qpq.federation")

_ERRORS: dict[str, type[RequestError]] = {
    "unknown_user": UnknownUser, "not_found": NotFound, "rate_limited": RateLimited,
    "bad_request": BadRequest, "quota_exceeded": QuotaExceeded}


class Federation:
    def __init__(self, config: Config, storage: Storage, metrics: ServerMetrics,
                 clock: Callable[[], float], settings: FederationSettings | None = None,
                 ) -> None:
        self.config = config
        self.settings = settings or load_settings(config)
        self.storage = storage
        self.metrics = metrics
        self.clock = clock
        fed = config.federation
        self.peer_limiter = RateLimiter(fed.peer_rate_per_s, fed.peer_burst)
        self._links: dict[str, PeerLink] = {}
        self._link_locks: dict[str, asyncio.Lock] = {}
        self.relayers: dict[str, Relayer] = {}
        self.listener: FederationListener | None = None
        self._inbound: InboundHandler | None = None
        self._tasks: list[asyncio.Task[None]] = []
        for peer in self.settings.peers.values():
            if peer.address:  # the peers we relay to (an address-less one only calls us)
                metrics.federation_peer_up.labels(peer=peer.domain)
                metrics.federation_queue_depth.labels(peer=peer.domain)

    @property
    def domain(self) -> str:
        return self.settings.domain

    # -- routing (the service's enqueue) -----------------------------------------------
    def split(self, recipients: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
        """Local names, and (user, peer domain) pairs; unknown domains are refused."""
        local: list[str] = []
        remote: list[tuple[str, str]] = []
        for name in recipients:
            user, domain = split_address(name, self.domain)
            if domain is None:
                local.append(user)
            elif domain not in self.settings.peers:
                raise UnknownUser(f"{name!r}: {domain!r} is not a federation peer of this "
                                  "server")
            elif not self.settings.peers[domain].address:
                raise UnknownUser(f"{name!r}: peer {domain!r} has no address configured "
                                  "here ([[federation.peers]] address), so nothing can be "
                                  "relayed to it")
            else:
                remote.append((user, domain))
        return list(dict.fromkeys(local)), list(dict.fromkeys(remote))

    async def check_outbox(self, remote: Sequence[tuple[str, str]], size: int) -> None:
        limit = self.config.federation.outbox_max_bytes
        mailboxes = [outbox_mailbox(d) for _, d in remote]
        usage = await self.storage.mailbox_bytes(mailboxes)
        full = sorted({m for m in mailboxes if usage.get(m, 0) + size > limit})
        if full:
            self.metrics.quota_refused_total.labels(kind="federation_outbox").inc()
            raise QuotaExceeded("the outbound queue to " + ", ".join(
                m.split(":", 1)[1] for m in full) + " is full (the peer has been away); "
                "try later")

    async def queue(self, sender: str, remote: Sequence[tuple[str, str]], payload: bytes,
                    now: float) -> list[int]:
        """Durably queue one relay per remote recipient; the relayer takes it from there."""
        ids: list[int] = []
        for user, domain in remote:
            ids += await self.storage.enqueue(sender, [outbox_mailbox(domain)],
                                              pack_entry(user, payload), now)
        for domain in dict.fromkeys(d for _, d in remote):
            relayer = self.relayers.get(domain)
            if relayer is not None:
                relayer.wake()
        return ids

    # -- lookups through the peer ------------------------------------------------------
    async def link(self, domain: str) -> PeerLink:
        peer = self.settings.peers[domain]
        lock = self._link_locks.setdefault(domain, asyncio.Lock())
        async with lock:
            current = self._links.get(domain)
            if current is not None and current.alive:
                return current
            if not peer.address:
                raise LinkError("unreachable", f"no address configured for peer {domain}")
            s = self.settings
            link = await open_link(peer.address, domain, s.domain, ca_pem=s.ca_pem,
                                   certificate=s.certificate, key=s.key,
                                   timeout=self.config.federation.connect_timeout_s)
            self._links[domain] = link
            return link

    async def call_peer(self, domain: str, op: str, **fields: Any) -> dict[str, Any]:
        if domain not in self.settings.peers:
            raise UnknownUser(f"{domain!r} is not a federation peer of this server")
        try:
            answer = await (await self.link(domain)).call(op, **fields)
        except LinkError as exc:
            error = _ERRORS.get(exc.code)
            if error is not None:
                raise error(f"{domain}: {exc}") from None
            raise ServerBusy(f"federation peer {domain} is unavailable ({exc}); "
                             "try later") from None
        answer.pop("ok", None)
        return answer

    async def remote_keys(self, requester: str, user: str, domain: str) -> dict[str, Any]:
        return await self.call_peer(domain, "keys", username=user,
                                    requester=f"{requester}@{self.domain}")

    def wrap_kt_ops(self, ops: Mapping[str, Handler]) -> dict[str, Handler]:
        """The log operations take an optional `domain`: another domain's log is read
        through that peer, so clients verify remote keys against the peer's own head."""
        def wrap(name: str, local: Handler) -> Handler:
            async def handler(request: dict[str, Any],
                              conn: ConnectionState) -> dict[str, Any]:
                domain = request.get("domain")
                if domain is None or domain == self.domain:
                    return await local(request, conn)
                if not isinstance(domain, str):
                    raise BadRequest("field 'domain' must be a string")
                fields = {k: v for k, v in request.items() if k not in ("op", "domain")}
                return await self.call_peer(domain.lower(), "kt", call=name, **fields)
            return handler

        return {name: wrap(name, handler) for name, handler in ops.items()}

    # -- running -----------------------------------------------------------------------
    async def start(self, delivery: Delivery, kt_ops: Mapping[str, Handler],
                    on_removed: Callable[[int], None], *, relay: bool,
                    reuse_port: bool = False) -> None:
        """Listen for peers; with `relay`, run one relayer per peer (one process of a
        host relays, so two never send one outbox concurrently)."""
        fed = self.config.federation
        inbound = InboundHandler(self.settings, self.storage, self.metrics, delivery, kt_ops,
                                 self.peer_limiter, self.clock)
        self._inbound = inbound
        listener = FederationListener(self.settings, inbound.handle,
                                      hello_timeout_s=self.config.quic.hello_timeout_s,
                                      idle_timeout_s=self.config.quic.idle_timeout_s)
        host, port = parse_hostport(fed.listen)
        try:
            await listener.start(host, port, reuse_port=reuse_port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on UDP {fed.listen} for federation: "
                              f"{exc.strerror}") from None
        self.listener = listener
        loop = asyncio.get_running_loop()
        if relay:
            for peer in self.settings.peers.values():
                if not peer.address:
                    continue
                relayer = Relayer(peer, self.settings, self.storage, self.metrics, self.link,
                                  on_removed, self.clock, fed.poll_interval_s,
                                  fed.probe_interval_s)
                self.relayers[peer.domain] = relayer
                self._tasks.append(loop.create_task(relayer.run()))
            self._tasks.append(loop.create_task(self._forget_old_relays()))
        log.info("federation listening", extra={"listen": fed.listen, "port": listener.port,
                                                "domain": self.domain,
                                                "peers": sorted(self.settings.peers)})

    async def _forget_old_relays(self) -> None:
        while True:
            with contextlib.suppress(QpqError, OSError):
                await self.storage.forget_relays(
                    self.clock() - self.config.federation.remember_relays_s)
            await asyncio.sleep(3600)

    def reload(self) -> None:
        """SIGHUP: re-read the federation certificate, key and CA (after `qpq-ops rotate
        federation`). New connections use them; open links are dropped so the next
        relay reconnects with the new certificate. Raises ConfigError, keeping the old
        ones, when the new files do not fit together."""
        settings = load_settings(self.config)
        self.settings = settings
        if self._inbound is not None:
            self._inbound.settings = settings
        if self.listener is not None:
            self.listener.configuration.certificate = settings.certificate
            self.listener.configuration.private_key = settings.key
        for relayer in self.relayers.values():
            relayer.settings = settings
        for link in self._links.values():
            link.close()
        self._links.clear()

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for link in self._links.values():
            link.close()
        self._links.clear()
        if self.listener is not None:
            self.listener.close()
