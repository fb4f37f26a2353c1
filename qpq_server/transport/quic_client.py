"""The client side of QUIC, shared by the client library and federation links.

One request per bidirectional stream, answered by one frame; the handshake is resolved
on `HandshakeCompleted` ourselves (aioquic's wait_connected can miss it when wrapped in
timeouts) and `StreamDataReceived` is read directly (aioquic's stream readers are never
pruned). Callers subclass `RequestProtocol` to name their errors (`failure`) and to
handle streams of their own (`other_stream_data`, `stream_reset`, `terminated_with`),
and connect with `open_quic`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, TypeVar

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

from qpq_server.protocol.codec import FrameDecoder, encode_frame

__all__ = ["RequestProtocol", "open_quic"]

MAX_FRAME = 64 * 1024 * 1024
P = TypeVar("P", bound="RequestProtocol")


class RequestProtocol(QuicConnectionProtocol):
    """Futures per request stream; `failure(kind, message)` makes the caller's error for
    kind `bad_response`, `stream_reset` or `closed`."""

    def __init__(self, quic: QuicConnection, **kwargs: Any) -> None:
        super().__init__(quic, **kwargs)
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending: dict[int, tuple[FrameDecoder, asyncio.Future[dict[str, Any]]]] = {}
        self.terminated: str | None = None

    def failure(self, kind: str, message: str) -> Exception:
        raise NotImplementedError

    def request(self, message: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        return self.send_raw(encode_frame(message))

    def send_raw(self, data: bytes, end_stream: bool = True) -> asyncio.Future[dict[str, Any]]:
        """`data` as a new request stream (tests send hostile input this way)."""
        if self.terminated is not None:
            raise self.failure("closed", self.terminated)
        sid = self._quic.get_next_available_stream_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[sid] = (FrameDecoder(MAX_FRAME), future)
        self._quic.send_stream_data(sid, data, end_stream=end_stream)
        self.transmit()
        return future

    def _settle(self, sid: int, result: dict[str, Any] | Exception) -> None:
        entry = self._pending.pop(sid, None)
        if entry is None or entry[1].done():
            return
        if isinstance(result, Exception):
            entry[1].set_exception(result)
        else:
            entry[1].set_result(result)

    # -- hooks for subclasses --------------------------------------------------------
    def other_stream_data(self, event: StreamDataReceived) -> bool:
        """Data on a stream that is not a pending request; True if handled."""
        return False

    def stream_reset(self, stream_id: int, error: Exception) -> None:
        """A stream the peer reset (pending requests are failed already)."""

    def terminated_with(self, error: Exception) -> None:
        """The connection ended (pending requests are failed already)."""

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            if not self.handshake.done():
                self.handshake.set_result(None)
        elif isinstance(event, StreamDataReceived):
            if self.other_stream_data(event) or event.stream_id not in self._pending:
                return
            try:
                frames = self._pending[event.stream_id][0].feed(event.data)
            except Exception as exc:  # a garbled answer ends only this request
                self._settle(event.stream_id, self.failure("bad_response", str(exc)))
                return
            if frames:
                self._settle(event.stream_id, frames[0])
            elif event.end_stream:
                self._settle(event.stream_id,
                             self.failure("bad_response", "stream ended early"))
        elif isinstance(event, StreamReset):
            error = self.failure("stream_reset", "the peer reset the stream")
            self._settle(event.stream_id, error)
            self.stream_reset(event.stream_id, error)
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event.reason_phrase or f"connection closed (error {event.error_code})"
            error = self.failure("closed", self.terminated)
            if not self.handshake.done():
                self.handshake.set_exception(error)
            for sid in list(self._pending):
                self._settle(sid, error)
            self.terminated_with(error)


async def open_quic(host: str, port: int, configuration: QuicConfiguration,
                    factory: Callable[[QuicConnection], P], *, timeout: float,
                    target: str, unreachable: Callable[[str], Exception],
                    local_host: str | None = None,
                    ) -> tuple[asyncio.DatagramTransport, P]:
    """Resolve `host`, open a UDP socket (on `local_host`, default any), connect and
    complete the TLS 1.3 handshake within `timeout`. Errors before the handshake are
    `unreachable(message)` (`target` names the peer in them); on failure nothing stays
    open."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise unreachable(f"cannot resolve {host}: {exc}") from None
    family, _, _, _, addr = infos[0]
    quic = QuicConnection(configuration=configuration)
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: factory(quic), family=family,
        local_addr=(local_host or ("0.0.0.0" if family == socket.AF_INET else "::"), 0))
    try:
        protocol.connect(addr)
        try:
            async with asyncio.timeout(timeout):
                await protocol.handshake
        except TimeoutError:
            raise unreachable(f"no QUIC handshake with {target} within {timeout:g}s"
                              ) from None
    except BaseException:
        protocol.close()
        transport.close()
        raise
    return transport, protocol
