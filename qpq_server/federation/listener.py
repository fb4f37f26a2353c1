"""The federation listener: QUIC on `[federation] listen`, ALPN `qpq-fed/1`.

The TLS handshake presents our federation certificate; the peer then authenticates in
the channel (`fed_hello`, `fed_auth`, see `auth`) before any other request. A
connection that has not authenticated within the hello timeout, or fails to, is closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived

from qpq_server.errors import BadFrame, QpqError, RequestError
from qpq_server.federation import ALPN
from qpq_server.federation.settings import FederationSettings
from qpq_server.protocol.codec import FrameDecoder, encode_frame
from qpq_server.protocol.dispatch import error_body

__all__ = ["FederationListener", "PeerState"]

log = logging.getLogger("qpq.federation")

ERR_REFUSED = 0x103
_MAX_FRAME = 16 * 1024 * 1024  # a relay batch: several messages of max_frame_bytes
_MAX_PREAUTH_BYTES = 16384
_INTERNAL: dict[str, Any] = {"ok": False, "error": {"code": "internal",
                                                    "message": "internal error"}}


class PeerState:
    """What one inbound connection has proved so far."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.challenge: bytes | None = None
        self.domain: str | None = None  # set once fed_auth succeeded

    @property
    def authenticated(self) -> bool:
        return self.domain is not None


Handler = Callable[[dict[str, Any], PeerState], Awaitable[dict[str, Any]]]


class _Protocol(QuicConnectionProtocol):
    def __init__(self, quic: QuicConnection, *, handle: Handler, hello_timeout_s: float,
                 protocols: set[_Protocol], **kwargs: Any) -> None:
        super().__init__(quic, **kwargs)
        self._handle = handle
        self._decoders: dict[int, FrameDecoder] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._protocols = protocols
        self._state: PeerState | None = None
        self._preauth_bytes = 0
        protocols.add(self)
        self._hello_timer = asyncio.get_running_loop().call_later(hello_timeout_s, self._timeout)

    def _timeout(self) -> None:
        if self._state is None or not self._state.authenticated:
            self.refuse("federation peer did not authenticate in time")

    def refuse(self, phrase: str) -> None:
        self._quic.close(error_code=ERR_REFUSED, reason_phrase=phrase)
        self.transmit()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self._state is None:  # the source address the peer is checked against
            self._state = PeerState(str(addr[0]))
        super().datagram_received(data, addr)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamDataReceived):
            self._stream_data(event)
        elif isinstance(event, ConnectionTerminated):
            self._hello_timer.cancel()
            self._protocols.discard(self)
            for task in self._tasks:
                task.cancel()

    def _stream_data(self, event: StreamDataReceived) -> None:
        sid = event.stream_id
        if sid % 4 != 0:
            return  # requests come on peer-initiated bidirectional streams only
        if self._state is None:
            return
        if not self._state.authenticated:
            self._preauth_bytes += len(event.data)
            if self._preauth_bytes > _MAX_PREAUTH_BYTES:
                self.refuse("too many bytes before authenticating")
                return
        decoder = self._decoders.setdefault(sid, FrameDecoder(_MAX_FRAME))
        try:
            frames = decoder.feed(event.data)
            if not frames and event.end_stream:
                raise BadFrame("empty stream: send one length-prefixed request frame")
        except RequestError as exc:
            self._decoders.pop(sid, None)
            self._reply(sid, error_body(exc))
            return
        if frames:
            self._decoders.pop(sid, None)
            task = asyncio.get_running_loop().create_task(self._serve(sid, frames[0]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, sid: int, request: dict[str, Any]) -> None:
        assert self._state is not None
        try:
            response = await self._handle(request, self._state)
        except RequestError as exc:
            response = error_body(exc)
        except QpqError as exc:
            log.error("federation request failed", extra={"code": exc.code})
            response = _INTERNAL
        except Exception:  # a bug answers `internal`; the connection and server live on
            log.exception("unexpected error handling a federation request",
                          extra={"op": str(request.get("op"))[:32]})
            response = _INTERNAL
        self._reply(sid, response)
        if response.get("error", {}).get("code") == "refused":
            self.refuse(str(response["error"].get("message", "refused")))

    def _reply(self, sid: int, response: dict[str, Any]) -> None:
        try:
            self._quic.send_stream_data(sid, encode_frame(response), end_stream=True)
        except (ValueError, AssertionError, RuntimeError):
            return  # the stream was reset or the connection closed
        self.transmit()


class FederationListener:
    def __init__(self, settings: FederationSettings, handle: Handler,
                 hello_timeout_s: float, idle_timeout_s: float) -> None:
        self._handle = handle
        self._hello_timeout_s = hello_timeout_s
        self.configuration = QuicConfiguration(is_client=False, alpn_protocols=[ALPN],
                                               idle_timeout=idle_timeout_s)
        self.configuration.certificate = settings.certificate
        self.configuration.private_key = settings.key
        self._protocols: set[_Protocol] = set()
        self._server: QuicServer | None = None
        self._transport: asyncio.DatagramTransport | None = None

    @property
    def port(self) -> int:
        assert self._transport is not None
        return int(self._transport.get_extra_info("sockname")[1])

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        def factory(quic: QuicConnection, **kwargs: Any) -> _Protocol:
            return _Protocol(quic, handle=self._handle, hello_timeout_s=self._hello_timeout_s,
                             protocols=self._protocols, **kwargs)

        transport, server = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: QuicServer(configuration=self.configuration, create_protocol=factory),
            local_addr=(host, port), reuse_port=reuse_port)
        self._transport, self._server = transport, server

    def close(self) -> None:
        for protocol in list(self._protocols):
            protocol.refuse("server shutting down")
        if self._server is not None:
            self._server.close()
            self._server = None
