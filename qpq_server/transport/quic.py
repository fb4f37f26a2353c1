"""QUIC transport on aioquic: one request per bidirectional stream.

We handle `StreamDataReceived` ourselves (aioquic's stream-reader path never prunes
its per-stream dict), resolve the handshake on `HandshakeCompleted`, and apply the
connection cap, handshake flood limits and the stream limit here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.packet import QuicErrorCode, QuicFrameType
from aioquic.quic.retry import QuicRetryTokenHandler

from qpq_server.blobs.transfer import BLOB_OPS, BlobStream, BlobTransfers
from qpq_server.config import Config
from qpq_server.errors import BadFrame, QpqError, RequestError
from qpq_server.metrics import ServerMetrics
from qpq_server.protocol.codec import FrameDecoder, encode_frame
from qpq_server.protocol.dispatch import ConnectionState, Dispatcher
from qpq_server.transport.handshake_state import release_handshake_state

__all__ = ["ALPN", "QuicListener", "quic_server_configuration"]

log = logging.getLogger("qpq.quic")

ALPN = "qpq/1"
# QUIC application error code sent to clients when the server shuts down.
ERR_SHUTDOWN = 0x102
# ... when a connection breaks a pre-auth limit or its access token was revoked.
ERR_REFUSED = 0x103


def quic_server_configuration(config: Config) -> QuicConfiguration:
    qc = QuicConfiguration(
        is_client=False,
        alpn_protocols=[ALPN],
        idle_timeout=config.quic.idle_timeout_s,
        max_datagram_frame_size=None,
    )
    qc.load_cert_chain(str(config.tls_cert_path), str(config.tls_key_path))
    return qc


class _Tracker:
    """Connection counts shared by all protocols of one listener."""

    def __init__(self) -> None:
        self.active = 0
        self.handshaking = 0
        self.in_flight_requests = 0
        self.accepting = True
        self.protocols: set[QpqServerProtocol] = set()
        self.unauthenticated = 0
        self.unauthenticated_by_address: dict[str, int] = {}

    def count_unauthenticated(self, peer: str, delta: int) -> None:
        self.unauthenticated += delta
        left = self.unauthenticated_by_address.get(peer, 0) + delta
        if left > 0:
            self.unauthenticated_by_address[peer] = left
        else:
            self.unauthenticated_by_address.pop(peer, None)


class QpqServerProtocol(QuicConnectionProtocol):
    def __init__(self, quic: QuicConnection, *, dispatcher: Dispatcher,
                 metrics: ServerMetrics, on_closed: Callable[[ConnectionState], None],
                 config: Config, tracker: _Tracker, on_handshaking_changed: Callable[[], None],
                 blobs: BlobTransfers | None = None, **kwargs: Any) -> None:
        super().__init__(quic, **kwargs)
        self._blobs = blobs
        self._blob_streams: dict[int, BlobStream] = {}
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._on_closed = on_closed
        self._config = config
        self._tracker = tracker
        self._on_handshaking_changed = on_handshaking_changed
        self._decoders: dict[int, FrameDecoder] = {}
        self._answered: set[int] = set()
        self._state = ConnectionState(peer="unknown")
        self._started = time.perf_counter()
        self._gone = False
        self._admitted = False
        self._unauthenticated = False  # counted in the tracker's pre-auth budgets
        self._preauth_bytes = 0
        self._timeout: asyncio.TimerHandle | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # aioquic has no max-streams option: it hard-codes 128 in QuicConnection.__init__.
        limit = config.quic.max_concurrent_bidi_streams
        quic._local_max_streams_bidi.value = limit
        quic._local_max_streams_bidi.sent = limit
        self._refuse: tuple[str, str] | None = None
        self._counted = False
        self._handshake_done = True

    def _admit(self, peer: str) -> None:
        """First datagram: the peer address is known; take a slot or refuse."""
        self._admitted = True
        self._state.peer = peer
        refuse = self._refusal_reason()
        self._refuse = refuse
        if refuse is not None:
            # A refused connection is not counted: it only lingers in aioquic's table
            # until its CONNECTION_CLOSE has been sent.
            self._metrics.connections_refused_total.labels(reason=refuse[0]).inc()
            return
        tracker = self._tracker
        self._counted = True
        self._handshake_done = False
        tracker.active += 1
        tracker.handshaking += 1
        tracker.protocols.add(self)
        tracker.count_unauthenticated(peer, +1)
        self._unauthenticated = True
        self._metrics.connections_active.set(tracker.active)
        self._on_handshaking_changed()
        self._timeout = asyncio.get_running_loop().call_later(
            self._config.quic.handshake_timeout_s, self._handshake_timed_out)

    def _refusal_reason(self) -> tuple[str, str] | None:
        t, q = self._tracker, self._config.quic
        if not t.accepting:
            return "draining", "server is shutting down"
        if t.active >= q.max_connections:
            return "cap", f"server at its connection cap ({q.max_connections}); try later"
        if t.handshaking >= q.max_handshakes_in_flight:
            return "handshakes", "too many handshakes in flight; try later"
        if t.unauthenticated >= q.max_unauthenticated_connections:
            return "unauthenticated_cap", "too many connections without the access token; try later"
        if t.unauthenticated_by_address.get(self._state.peer, 0) >= \
                q.max_unauthenticated_per_address:
            return ("unauthenticated_address",
                    "too many connections without the access token from this address")
        return None

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if not self._admitted:
            self._admit(str(addr[0]))
        super().datagram_received(data, addr)
        if self._refuse is not None and not self._gone:
            # Closed after the first Initial is processed, so the client can read why. A
            # transport-level CONNECTION_REFUSED keeps the reason phrase; an application
            # close sent before the handshake completes would have it stripped.
            self._quic.close(error_code=QuicErrorCode.CONNECTION_REFUSED,
                             frame_type=QuicFrameType.PADDING, reason_phrase=self._refuse[1])
            self._refuse = None
            self.transmit()

    def _handshake_timed_out(self) -> None:
        if not self._handshake_done and not self._gone:
            self._metrics.connections_refused_total.labels(reason="handshake_timeout").inc()
            self._quic.close(error_code=QuicErrorCode.CONNECTION_REFUSED,
                             frame_type=QuicFrameType.PADDING,
                             reason_phrase="handshake timed out")
            self.transmit()
            self._end_handshake()  # free the slot now, not after the close lingers

    def _hello_timed_out(self) -> None:
        if self._unauthenticated and not self._gone:
            self._close_unauthenticated(
                "hello_timeout", "no access token presented in time; send 'hello' first")

    def _close_unauthenticated(self, reason: str, phrase: str) -> None:
        self._metrics.connections_refused_total.labels(reason=reason).inc()
        self.close_with(ERR_REFUSED, phrase)

    def close_with(self, error_code: int, phrase: str) -> None:
        """Close the connection with an application error the client can read."""
        if not self._gone:
            self._quic.close(error_code=error_code, reason_phrase=phrase)
            self.transmit()

    def _authenticated(self) -> None:
        """The access token was accepted: leave the pre-auth budgets."""
        if self._unauthenticated:
            self._unauthenticated = False
            self._tracker.count_unauthenticated(self._state.peer, -1)
            if self._hello_timer is not None:
                self._hello_timer.cancel()

    def _end_handshake(self) -> None:
        if not self._handshake_done:
            self._handshake_done = True
            self._tracker.handshaking -= 1
            self._on_handshaking_changed()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            release_handshake_state(self._quic)  # ~48 KiB of CRYPTO buffers per connection
            self._end_handshake()
            if self._timeout is not None:
                self._timeout.cancel()
            self._metrics.tls_handshake_duration_seconds.observe(
                time.perf_counter() - self._started)
            if self._unauthenticated and not self._gone:
                self._hello_timer = asyncio.get_running_loop().call_later(
                    self._config.quic.hello_timeout_s, self._hello_timed_out)
        elif isinstance(event, StreamDataReceived):
            self._stream_data(event)
        elif isinstance(event, StreamReset):
            self._decoders.pop(event.stream_id, None)
            blob_stream = self._blob_streams.pop(event.stream_id, None)
            if blob_stream is not None:
                blob_stream.reset()
        elif isinstance(event, ConnectionTerminated):
            self._terminated()

    def _stream_data(self, event: StreamDataReceived) -> None:
        sid = event.stream_id
        blob_stream = self._blob_streams.get(sid)
        if blob_stream is not None:  # a blob upload: many frames on one stream
            blob_stream.feed(event.data, event.end_stream)
            return
        if sid % 4 != 0 or sid in self._answered:
            return  # only client-initiated bidi streams carry requests; one per stream
        if self._unauthenticated:
            self._preauth_bytes += len(event.data)
            if self._preauth_bytes > self._config.quic.max_preauth_bytes:
                self._decoders.clear()
                self._close_unauthenticated(
                    "preauth_bytes", "too many bytes before the access token; send 'hello'")
                return
        decoder = self._decoders.get(sid)
        if decoder is None:
            decoder = self._decoders[sid] = FrameDecoder(self._config.quic.max_frame_bytes)
        try:
            frames = decoder.feed(event.data)
            if not frames and event.end_stream:
                decoder.finish()
                raise BadFrame("empty stream: send one length-prefixed request frame")
        except RequestError as exc:
            self._reply(sid, self._dispatcher.error_response("frame", exc))
            return
        if frames:
            self._decoders.pop(sid, None)
            self._answered.add(sid)
            op = frames[0].get("op")
            if self._blobs is not None and isinstance(op, str) and op in BLOB_OPS:
                self._open_blob_stream(sid, frames, decoder, event.end_stream)
                return
            task = asyncio.get_running_loop().create_task(self._serve_request(sid, frames[0]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _open_blob_stream(self, sid: int, frames: list[dict[str, Any]], decoder: FrameDecoder,
                          end: bool) -> None:
        assert self._blobs is not None
        self._blob_streams = {k: s for k, s in self._blob_streams.items() if not s.finished}
        stream = self._blobs.open_stream(frames[0], self._state, _QuicStreamSink(self, sid),
                                         decoder)
        self._blob_streams[sid] = stream
        stream.feed(b"", end, frames[1:])

    async def _serve_request(self, sid: int, request: dict[str, Any]) -> None:
        self._tracker.in_flight_requests += 1
        try:
            response = await self._dispatcher.handle(request, self._state)
            if self._unauthenticated and self._state.authenticated:
                self._authenticated()
        except QpqError:  # handle() maps errors itself; this is belt and braces
            response = {"ok": False, "error": {"code": "internal", "message": "internal error"}}
        finally:
            self._tracker.in_flight_requests -= 1
        self._reply(sid, response)

    def _reply(self, sid: int, response: dict[str, Any]) -> None:
        self._decoders.pop(sid, None)
        self._answered.add(sid)
        if self._gone:
            return
        try:
            self._quic.send_stream_data(sid, encode_frame(response), end_stream=True)
        except (ValueError, AssertionError, RuntimeError):
            return  # stream already reset or closed by the peer
        self.transmit()
        if len(self._answered) > 4096:
            self._answered = {s for s in self._answered if s >= sid - 4 * 4096}

    def _terminated(self) -> None:
        if self._gone:
            return
        self._gone = True
        self._decoders.clear()
        for blob_stream in self._blob_streams.values():
            blob_stream.reset()  # a cut-off upload leaves nothing behind
        self._blob_streams.clear()
        if not self._counted:
            return
        self._end_handshake()
        if self._timeout is not None:
            self._timeout.cancel()
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if self._unauthenticated:
            self._unauthenticated = False
            self._tracker.count_unauthenticated(self._state.peer, -1)
        self._tracker.active -= 1
        self._tracker.protocols.discard(self)
        self._metrics.connections_active.set(self._tracker.active)
        self._on_closed(self._state)

    def close_for_shutdown(self) -> None:
        if not self._gone:
            self._quic.close(error_code=ERR_SHUTDOWN, reason_phrase="server shutting down")
            self.transmit()


class _QuicStreamSink:
    """A blob stream's view of its QUIC stream."""

    def __init__(self, protocol: QpqServerProtocol, sid: int) -> None:
        self._protocol = protocol
        self._sid = sid

    @property
    def closed(self) -> bool:
        return self._protocol._gone

    def send(self, data: bytes, end: bool = False) -> bool:
        if self._protocol._gone:
            return False
        try:
            self._protocol._quic.send_stream_data(self._sid, data, end_stream=end)
        except (ValueError, AssertionError, RuntimeError):
            return False  # reset by the peer (STOP_SENDING) or already finished
        self._protocol.transmit()
        return True

    def unacked_bytes(self) -> int:
        # aioquic keeps sent data until the peer acknowledges it; this is what a
        # download may add to server memory, so downloads pace themselves by it.
        stream = self._protocol._quic._streams.get(self._sid)
        return len(stream.sender._buffer) if stream is not None else 0

    def stop_receiving(self) -> None:
        if self._protocol._gone:
            return
        try:
            self._protocol._quic.stop_stream(self._sid, 0)
        except (ValueError, AssertionError, RuntimeError):
            return
        self._protocol.transmit()


class QuicListener:
    def __init__(self, config: Config, dispatcher: Dispatcher, metrics: ServerMetrics,
                 on_closed: Callable[[ConnectionState], None],
                 blobs: BlobTransfers | None = None) -> None:
        self._config = config
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._on_closed = on_closed
        self._blobs = blobs
        self._tracker = _Tracker()
        self.configuration = quic_server_configuration(config)
        self._server: QuicServer | None = None
        self._retry_handler = QuicRetryTokenHandler()
        self._closed = False

    @property
    def port(self) -> int:
        assert self._server is not None and self._server._transport is not None
        return int(self._server._transport.get_extra_info("sockname")[1])

    @property
    def in_flight_requests(self) -> int:
        return self._tracker.in_flight_requests

    def _update_retry(self) -> None:
        """`retry = auto`: ask for address validation only while handshakes pile up."""
        if self._server is None or self._config.quic.retry != "auto":
            return
        busy = self._tracker.handshaking > self._config.quic.max_handshakes_in_flight // 2
        self._server._retry = self._retry_handler if busy else None  # type: ignore[assignment]

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        """Listen on UDP host:port; with `reuse_port` several worker processes share the
        port and the kernel keeps each client 4-tuple on one of them."""
        def factory(quic: QuicConnection, **kwargs: Any) -> QpqServerProtocol:
            return QpqServerProtocol(quic, dispatcher=self._dispatcher, metrics=self._metrics,
                                     on_closed=self._on_closed, config=self._config,
                                     tracker=self._tracker, blobs=self._blobs,
                                     on_handshaking_changed=self._update_retry, **kwargs)

        # aioquic's serve() without its fixed socket options: SO_REUSEPORT is ours to set.
        _, server = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: QuicServer(configuration=self.configuration, create_protocol=factory,
                               retry=self._config.quic.retry == "always"),
            local_addr=(host, port), reuse_port=reuse_port)
        self._server = server
        self._metrics.connections_max.set(self._config.quic.max_connections)

    def reload_certificate(self) -> None:
        """New handshakes use the new certificate; established connections keep theirs."""
        self.configuration.load_cert_chain(str(self._config.tls_cert_path),
                                           str(self._config.tls_key_path))

    def close_where(self, predicate: Callable[[ConnectionState], bool], phrase: str) -> int:
        """Close every connection whose state matches (a revoked access token)."""
        closed = 0
        for protocol in list(self._tracker.protocols):
            if predicate(protocol._state):
                protocol.close_with(ERR_REFUSED, phrase)
                closed += 1
        return closed

    def stop_accepting(self) -> None:
        self._tracker.accepting = False

    def close(self) -> None:
        """Close every connection and the socket; safe to call again."""
        if self._closed:
            return
        self._closed = True
        for protocol in list(self._tracker.protocols):
            protocol.close_for_shutdown()
        if self._server is not None:
            self._server.close()
            self._server = None
