"""The outbound side of a federation link: connect to a peer's listener, check its
certificate in the TLS handshake (federation CA, peer domain), authenticate ourselves
in the channel (see `auth`), then one request per bidirectional stream."""

from __future__ import annotations

import asyncio
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from qpq_server.config import parse_hostport
from qpq_server.federation import ALPN
from qpq_server.federation.auth import auth_message, sign
from qpq_server.transport.quic_client import RequestProtocol, open_quic

__all__ = ["LinkError", "PeerLink", "open_link"]


class LinkError(Exception):
    """The peer could not be reached or refused us; `code` is stable (wire codes of the
    peer's error answers, or unreachable / refused / bad_response)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Protocol(RequestProtocol):
    def failure(self, kind: str, message: str) -> Exception:
        # a reset stream or a closed connection: the peer is unreachable for now
        return LinkError("bad_response" if kind == "bad_response" else "unreachable", message)


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
        async with asyncio.timeout(self.timeout):
            return await self._protocol.send_raw(data)

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
    transport, protocol = await open_quic(
        host, port, configuration, _Protocol, timeout=timeout,
        target=f"{peer_domain} at {address}",
        unreachable=lambda message: LinkError("unreachable", message), local_host=local_host)
    link = PeerLink(protocol, transport, timeout)
    try:
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
