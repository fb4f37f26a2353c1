"""The outbound side of a federation link: connect to a peer's listener, check its
certificate in the TLS handshake (federation CA, peer domain), authenticate ourselves
in the channel (see `auth`), then one request per bidirectional stream."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from qpq_server.config import parse_hostport
from qpq_server.federation import ALPN
from qpq_server.federation.auth import auth_message, sign
from qpq_server.protocol.codec import FrameDecoder, encode_frame

__all__ = ["LinkError", "PeerLink", "open_link"]

_MAX_FRAME = 64 * 1024 * 1024


class LinkError(Exception):
    """The peer could not be reached or refused us; `code` is stable (wire codes of the
    peer's error answers, or unreachable / refused / bad_response)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Protocol(QuicConnectionProtocol):
    def __init__(self, quic: QuicConnection, **kwargs: Any) -> None:
        super().__init__(quic, **kwargs)
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending: dict[int, tuple[FrameDecoder, asyncio.Future[dict[str, Any]]]] = {}
        self.terminated: str | None = None

    def request(self, message: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        if self.terminated is not None:
            raise LinkError("unreachable", self.terminated)
        sid = self._quic.get_next_available_stream_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[sid] = (FrameDecoder(_MAX_FRAME), future)
        self._quic.send_stream_data(sid, encode_frame(message), end_stream=True)
        self.transmit()
        return future

    def _settle(self, sid: int, result: dict[str, Any] | LinkError) -> None:
        entry = self._pending.pop(sid, None)
        if entry is None or entry[1].done():
            return
        if isinstance(result, LinkError):
            entry[1].set_exception(result)
        else:
            entry[1].set_result(result)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted) and not self.handshake.done():
            self.handshake.set_result(None)
        elif isinstance(event, StreamDataReceived) and event.stream_id in self._pending:
            try:
                frames = self._pending[event.stream_id][0].feed(event.data)
            except Exception as exc:  # a garbled answer ends only this request
                self._settle(event.stream_id, LinkError("bad_response", str(exc)))
                return
            if frames:
                self._settle(event.stream_id, frames[0])
            elif event.end_stream:
                self._settle(event.stream_id, LinkError("bad_response", "stream ended early"))
        elif isinstance(event, StreamReset):
            self._settle(event.stream_id, LinkError("unreachable", "peer reset the stream"))
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event.reason_phrase or f"closed (error {event.error_code})"
            error = LinkError("unreachable", self.terminated)
            if not self.handshake.done():
                self.handshake.set_exception(error)
            for sid in list(self._pending):
                self._settle(sid, error)


class PeerLink:
    """An authenticated connection to one peer."""

    def __init__(self, protocol: _Protocol, transport: asyncio.BaseTransport,
                 timeout: float) -> None:
        self._protocol = protocol
        self._transport = transport
        self.timeout = timeout

    @property
    def alive(self) -> bool:
        return self._protocol.terminated is None

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The certificate the peer's listener presented (already verified against the
        federation CA and its domain in the handshake): for expiry checks."""
        tls = getattr(self._protocol._quic, "tls", None)
        cert = getattr(tls, "_peer_certificate", None)  # aioquic keeps it on its TLS state
        return cert if isinstance(cert, x509.Certificate) else None

    async def send_raw(self, data: bytes) -> dict[str, Any]:
        """Arbitrary bytes as one request stream (tests send hostile input)."""
        protocol = self._protocol
        sid = protocol._quic.get_next_available_stream_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        protocol._pending[sid] = (FrameDecoder(_MAX_FRAME), future)
        protocol._quic.send_stream_data(sid, data, end_stream=True)
        protocol.transmit()
        async with asyncio.timeout(self.timeout):
            return await future

    async def call(self, op: str, timeout: float | None = None,
                   **fields: Any) -> dict[str, Any]:
        timeout = timeout or self.timeout
        try:
            async with asyncio.timeout(timeout):
                answer = await self._protocol.request({"op": op, **fields})
        except TimeoutError:
            # A peer that went away without closing (killed, network gone) looks open
            # until the idle timeout: give up on this link so the next call reconnects.
            self.close()
            raise LinkError("unreachable", f"no answer to {op} within {timeout:g}s"
                            ) from None
        if not answer.get("ok"):
            error = answer.get("error") or {}
            raise LinkError(str(error.get("code", "unknown")), str(error.get("message", "")))
        return answer

    def close(self) -> None:
        if self._protocol.terminated is None:
            self._protocol.terminated = "closed by us"
        self._protocol.close()
        self._transport.close()


async def open_link(address: str, peer_domain: str, own_domain: str, *,
                    ca_pem: bytes, certificate: x509.Certificate,
                    key: ec.EllipticCurvePrivateKey, timeout: float = 10.0,
                    idle_timeout: float = 60.0, local_host: str | None = None,
                    authenticate: bool = True) -> PeerLink:
    """Connect to `peer_domain` at `address` and authenticate as `own_domain`
    (`authenticate=False`: stop after the TLS handshake, for tests of the listener)."""
    host, port = parse_hostport(address)
    configuration = QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                      idle_timeout=idle_timeout, server_name=peer_domain)
    configuration.load_verify_locations(cadata=ca_pem)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise LinkError("unreachable", f"cannot resolve {host}: {exc}") from None
    family, _, _, _, addr = infos[0]
    quic = QuicConnection(configuration=configuration)
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _Protocol(quic), family=family,
        local_addr=(local_host or ("0.0.0.0" if family == socket.AF_INET else "::"), 0))
    link = PeerLink(protocol, transport, timeout)
    try:
        protocol.connect(addr)
        try:
            async with asyncio.timeout(timeout):
                await protocol.handshake
        except TimeoutError:
            raise LinkError("unreachable", f"no QUIC handshake with {peer_domain} at "
                            f"{address} within {timeout:g}s") from None
        if not authenticate:
            return link
        hello = await link.call("fed_hello", domain=own_domain)
        challenge = hello.get("challenge")
        if not isinstance(challenge, bytes):
            raise LinkError("bad_response", "peer sent no challenge")
        await link.call("fed_auth", domain=own_domain,
                        certificate=certificate.public_bytes(serialization.Encoding.DER),
                        signature=sign(key, auth_message(peer_domain, own_domain, challenge)))
    except BaseException:
        link.close()
        raise
    return link
