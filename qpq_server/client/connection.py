"""A QUIC connection to a qpq server: one request per stream, futures per stream.

The QUIC plumbing (handshake, request futures, connecting) is
`qpq_server.transport.quic_client`, shared with federation links; this adds the
multi-frame streams of blob transfers and the client's error codes.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamDataReceived

from qpq_server.client.errors import ClientError
from qpq_server.protocol.codec import FrameDecoder, encode_frame
from qpq_server.transport.quic_client import RequestProtocol, open_quic

__all__ = ["ClientError", "QpqConnection", "connect"]

ALPN = "qpq/1"
_MAX_RESPONSE = 64 * 1024 * 1024
_UPLOAD_WINDOW = 4 * 1024 * 1024  # unacknowledged upload bytes kept in flight
BLOB_CHUNK_BYTES = 256 * 1024
_RATE_LIMIT_RETRIES = 6



StreamItem = dict[str, Any] | ClientError | None
"""A frame of a multi-frame stream, an error ending it, or None at its end."""


class _ClientProtocol(RequestProtocol):
    """Requests (one frame back) plus multi-frame streams for blob transfers."""

    def __init__(self, quic: QuicConnection, **kwargs: Any) -> None:
        super().__init__(quic, **kwargs)
        self._streams: dict[int, tuple[FrameDecoder, asyncio.Queue[StreamItem]]] = {}

    def failure(self, kind: str, message: str) -> Exception:
        code = {"closed": "connection_closed"}.get(kind, kind)
        return ClientError(code, message.replace("the peer", "the server", 1))

    def open_stream(self, first: dict[str, Any], end: bool = False,
                    ) -> tuple[int, asyncio.Queue[StreamItem]]:
        """A stream whose answer may be many frames (blob transfers): they arrive on
        the returned queue, then None at the end of the stream."""
        if self.terminated is not None:
            raise ClientError("connection_closed", self.terminated)
        sid = self._quic.get_next_available_stream_id()
        queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._streams[sid] = (FrameDecoder(_MAX_RESPONSE), queue)
        self._quic.send_stream_data(sid, encode_frame(first), end_stream=end)
        self.transmit()
        return sid, queue

    def stream_send(self, sid: int, data: bytes, end: bool = False) -> bool:
        """False when the stream can take no more (the server stopped it, or we closed)."""
        if self.terminated is not None:
            return False
        try:
            self._quic.send_stream_data(sid, data, end_stream=end)
        except (ValueError, AssertionError, RuntimeError):
            return False
        self.transmit()
        return True

    def unacked_bytes(self, sid: int) -> int:
        stream = self._quic._streams.get(sid)
        return len(stream.sender._buffer) if stream is not None else 0

    def other_stream_data(self, event: StreamDataReceived) -> bool:
        if event.stream_id not in self._streams:
            return False
        decoder, queue = self._streams[event.stream_id]
        try:
            for frame in decoder.feed(event.data):
                queue.put_nowait(frame)
            if event.end_stream:
                decoder.finish()
        except Exception as exc:
            queue.put_nowait(ClientError("bad_response", str(exc)))
            self._streams.pop(event.stream_id, None)
            return True
        if event.end_stream:
            queue.put_nowait(None)
            self._streams.pop(event.stream_id, None)
        return True

    def stream_reset(self, stream_id: int, error: Exception) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None and isinstance(error, ClientError):
            stream[1].put_nowait(error)

    def terminated_with(self, error: Exception) -> None:
        for _decoder, queue in self._streams.values():
            if isinstance(error, ClientError):
                queue.put_nowait(error)
        self._streams.clear()


class QpqConnection:
    """An open, token-authenticated connection. Use `call(op, **fields)`."""

    def __init__(self, protocol: _ClientProtocol, timeout: float, server: str = "") -> None:
        self._protocol = protocol
        self.timeout = timeout
        self.server = server  # HOST:PORT as given: names the server's pinned KT head
        self.hello: dict[str, Any] = {}  # the server's answer to hello (domain, limits)
        # how often call() retries a `rate_limited` answer (~5 s of backoff in all)
        self.rate_limit_retries = _RATE_LIMIT_RETRIES

    @property
    def protocol(self) -> _ClientProtocol:
        return self._protocol

    async def call_raw(self, message: dict[str, Any], timeout: float | None = None,
                       ) -> dict[str, Any]:
        async with asyncio.timeout(timeout or self.timeout):
            return await self._protocol.request(message)

    async def call(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request; back off and retry while the server says `rate_limited`
        (a refused request did nothing, so retrying it is safe)."""
        delay = 0.1
        for attempt in range(self.rate_limit_retries + 1):
            response = await self.call_raw({"op": op, **fields}, timeout)
            if response.get("ok"):
                return response
            error = response.get("error") or {}
            code = str(error.get("code", "unknown"))
            if code != "rate_limited" or attempt == self.rate_limit_retries:
                raise ClientError(code, str(error.get("message", "")))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    async def _next(self, queue: asyncio.Queue[StreamItem], what: str,
                    ) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(self.timeout):
                item = await queue.get()
        except TimeoutError:
            raise ClientError("timeout", f"no answer to {what} within {self.timeout:g}s") from None
        if isinstance(item, ClientError):
            raise item
        return item

    @staticmethod
    def _check(response: dict[str, Any] | None) -> dict[str, Any]:
        if response is None:
            raise ClientError("bad_response", "stream ended without an answer")
        if not response.get("ok"):
            error = response.get("error") or {}
            raise ClientError(str(error.get("code", "unknown")), str(error.get("message", "")))
        return response

    async def put_blob(self, session: str, source: BinaryIO, size: int, sha256: bytes,
                       chunk_bytes: int = BLOB_CHUNK_BYTES) -> dict[str, Any]:
        """Upload `size` bytes from `source` (already encrypted) on a stream of its own;
        stops at once if the server refuses early (quota, size)."""
        p = self._protocol
        sid, answers = p.open_stream({"op": "blob_put", "session": session, "size": size,
                                      "sha256": sha256})
        sent = 0
        while sent < size and answers.empty():
            data = source.read(min(chunk_bytes, size - sent))
            if not data or not p.stream_send(sid, encode_frame({"chunk": data})):
                break
            sent += len(data)
            while (p.unacked_bytes(sid) > _UPLOAD_WINDOW and answers.empty()
                   and p.terminated is None):
                await asyncio.sleep(0.005)
        if answers.empty():
            p.stream_send(sid, b"", end=True)
        return self._check(await self._next(answers, "blob_put"))

    async def get_blob(self, session: str, blob_id: bytes,
                       sink: Callable[[bytes], object], device: str | None = None) -> int:
        """Download a blob chunk by chunk into `sink`; return its size. `device`: which
        of the account's devices fetches it (each holds its own reference)."""
        request: dict[str, Any] = {"op": "blob_get", "session": session, "blob_id": blob_id}
        if device is not None:
            request["device"] = device
        _sid, answers = self._protocol.open_stream(request, end=True)
        size = int(self._check(await self._next(answers, "blob_get"))["size"])
        received = 0
        while (item := await self._next(answers, "blob_get")) is not None:
            chunk = item.get("chunk")
            if not isinstance(chunk, bytes):
                raise ClientError("bad_response", "blob stream carried a non-chunk frame")
            sink(chunk)
            received += len(chunk)
        if received != size:
            raise ClientError("bad_response", f"blob cut short: {received} of {size} bytes")
        return size

    def ping(self) -> None:
        self._protocol._quic.send_ping(0)
        self._protocol.transmit()


def _parse_server(server: str) -> tuple[str, int]:
    host, sep, port = server.rpartition(":")
    if not sep or not port.isdigit():
        raise ClientError("usage", f"--server must be HOST:PORT, got {server!r}")
    return host.strip("[]"), int(port)


@asynccontextmanager
async def connect(server: str, auth_token: str, *, ca: Path | None = None,
                  server_name: str | None = None, timeout: float = 10.0,
                  idle_timeout: float = 60.0, hello: bool = True,
                  local_host: str | None = None,
                  ) -> AsyncIterator[QpqConnection]:
    """Connect, complete the TLS 1.3 handshake, present the access token.
    `local_host` picks the source address (default: any)."""
    host, port = _parse_server(server)
    configuration = QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                      idle_timeout=idle_timeout,
                                      server_name=server_name or host)
    if ca is not None:
        try:
            configuration.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise ClientError("usage", f"cannot read CA certificate {ca}: {exc}") from None
    transport, protocol = await open_quic(
        host, port, configuration, _ClientProtocol, timeout=timeout, target=server,
        unreachable=lambda message: ClientError("unreachable", message),
        local_host=local_host)
    try:
        connection = QpqConnection(protocol, timeout, server)
        if hello:
            connection.hello = await connection.call("hello", token=auth_token)
        yield connection
    finally:
        protocol.close()
        await asyncio.sleep(0)
        transport.close()
