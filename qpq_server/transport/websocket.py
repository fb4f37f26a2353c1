"""WebSocket bridge (`[websocket] enabled = true`): the same msgpack RPC for browsers.

Meant to sit behind a TLS-terminating reverse proxy on loopback (default
127.0.0.1:7080). Each binary WebSocket message carries one msgpack request map (no
length prefix: WebSocket frames messages itself) and gets one response map; requests
on one socket run concurrently, so a response echoes the request's `id` (int or str)
when it has one. Requests go through the same `Service.handle` as QUIC: access token
via `hello`, sessions, rate limits, error codes. A bad message (text, not msgpack, not
a map, larger than max_frame_bytes) is answered with an error response, then the
socket is closed cleanly with a WebSocket close code (1003, 1007, 1009).

Blob transfers need a stream of their own and stay QUIC-only (`blob_put`/`blob_get`
answer `bad_request` here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import msgpack
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from qpq_server.config import Config
from qpq_server.errors import BadFrame, RequestError, TooLarge
from qpq_server.protocol.codec import decode_body
from qpq_server.protocol.dispatch import ConnectionState, Dispatcher

__all__ = ["WebSocketListener"]

log = logging.getLogger("qpq.websocket")

CLOSE_UNSUPPORTED = 1003  # a text message
CLOSE_INVALID = 1007  # not a msgpack map
CLOSE_POLICY = 1008  # policy violation: the access token was revoked
CLOSE_TOO_BIG = 1009
_SLACK = 64 * 1024  # the library itself drops messages this far above max_frame_bytes


class WebSocketListener:
    def __init__(self, config: Config, dispatcher: Dispatcher,
                 on_closed: Callable[[ConnectionState], None]) -> None:
        self._config = config
        self._dispatcher = dispatcher
        self._on_closed = on_closed
        self._server: Server | None = None
        self.in_flight_requests = 0
        self._open: dict[ServerConnection, ConnectionState] = {}

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        self._server = await serve(
            self._handle, host, port, compression=None,
            max_size=self._config.quic.max_frame_bytes + _SLACK,
            server_header=None, logger=log)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    def close_where(self, predicate: Callable[[ConnectionState], bool], phrase: str) -> int:
        """Close every socket whose state matches (a revoked access token)."""
        matching = [ws for ws, state in self._open.items() if predicate(state)]
        for ws in matching:
            asyncio.get_running_loop().create_task(ws.close(CLOSE_POLICY, phrase[:120]))
        return len(matching)

    def _peer(self, ws: ServerConnection) -> str:
        if self._config.websocket.trust_x_forwarded_for and ws.request is not None:
            forwarded = ws.request.headers.get("X-Forwarded-For", "")
            if forwarded:  # the last hop is the one our own proxy added
                return forwarded.rsplit(",", 1)[-1].strip()
        address = ws.remote_address
        return str(address[0]) if address else "unknown"

    async def _handle(self, ws: ServerConnection) -> None:
        state = ConnectionState(peer=self._peer(ws))
        tasks: set[asyncio.Task[None]] = set()
        # Backpressure: with max_in_flight requests running we stop reading, so the
        # socket's TCP window (not our memory) absorbs a flood.
        slots = asyncio.Semaphore(self._config.websocket.max_in_flight)
        self._open[ws] = state
        try:
            async for message in ws:
                request = await self._parse(ws, message)
                if request is None:
                    return
                await slots.acquire()
                task = asyncio.get_running_loop().create_task(self._serve(ws, request, state))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _: slots.release())
        except ConnectionClosed:
            pass
        finally:
            for task in tasks:
                task.cancel()
            self._open.pop(ws, None)
            self._on_closed(state)

    async def _parse(self, ws: ServerConnection, message: str | bytes,
                     ) -> dict[str, Any] | None:
        """The request map, or None after answering a bad message and closing."""
        limit = self._config.quic.max_frame_bytes
        try:
            if isinstance(message, str):
                raise BadFrame("text messages are not accepted: send msgpack as binary")
            if len(message) > limit:
                raise TooLarge(f"message of {len(message)} bytes exceeds "
                               f"max_frame_bytes={limit}")
            return decode_body(message)
        except RequestError as exc:
            code = (CLOSE_UNSUPPORTED if isinstance(message, str)
                    else CLOSE_TOO_BIG if isinstance(exc, TooLarge) else CLOSE_INVALID)
            with contextlib.suppress(ConnectionClosed):
                await ws.send(_pack(self._dispatcher.error_response("frame", exc)))
                await ws.close(code, exc.code)
            return None

    async def _serve(self, ws: ServerConnection, request: dict[str, Any],
                     state: ConnectionState) -> None:
        self.in_flight_requests += 1
        try:
            response = await self._dispatcher.handle(request, state)
        finally:
            self.in_flight_requests -= 1
        request_id = request.get("id")
        if isinstance(request_id, int | str) and not isinstance(request_id, bool):
            response["id"] = request_id
        with contextlib.suppress(ConnectionClosed):
            await ws.send(_pack(response))


def _pack(message: dict[str, Any]) -> bytes:
    return bytes(msgpack.packb(message, use_bin_type=True))
