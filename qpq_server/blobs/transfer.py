"""The blob stream protocol, for any transport that gives a request its own stream.

Upload (`blob_put`), client -> server on one stream::

    {"op": "blob_put", "session": S, "size": N, "sha256": 32 bytes}
    {"chunk": bytes} ...            each frame within max_frame_bytes, N bytes in all
    end of stream
  server -> client: one response frame, `{"ok": true, "blob_id", "size", "existing"}`
  or an error (`too_large`, `quota_exceeded`, `hash_mismatch`, `bad_request`, ...). On
  an early refusal the server also asks the client to stop sending (STOP_SENDING).

Download (`blob_get`)::

    {"op": "blob_get", "session": S, "blob_id": 32 bytes}, end of stream
  server -> client: {"ok": true, "size": N}, then {"chunk": bytes} frames, end of stream.

The server paces a download by the transport's unacknowledged bytes, so a slow reader
never makes it buffer the blob. Both count in `qpq_rpc_duration_seconds{op}` for the
whole transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from qpq_server.blobs.store import BlobStore, Upload
from qpq_server.errors import BadRequest, Internal, NotFound, RequestError, UploadStalled
from qpq_server.protocol import validate as v
from qpq_server.protocol.codec import FrameDecoder, encode_frame
from qpq_server.protocol.dispatch import ConnectionState, Dispatcher, Handler

__all__ = ["BLOB_OPS", "BlobStream", "BlobTransfers", "StreamAuthorizer", "StreamSink",
           "UploadStalled", "blob_ops"]

log = logging.getLogger("qpq.blobs")

BLOB_OPS = frozenset({"blob_put", "blob_get"})
_SEND_WINDOW = 2 * 1024 * 1024  # unacknowledged bytes allowed in flight per download
_FRAME_OVERHEAD = 64


class StreamSink(Protocol):
    """What a transport offers a blob stream: send, flow state, and stop the peer."""

    @property
    def closed(self) -> bool: ...

    def send(self, data: bytes, end: bool = False) -> bool:
        """Queue bytes; False when the stream or connection is gone."""

    def unacked_bytes(self) -> int: ...

    def stop_receiving(self) -> None: ...


class StreamAuthorizer(Protocol):
    """The request checks a streamed op passes before its stream is served."""

    def authorize_stream(self, request: dict[str, Any], conn: ConnectionState) -> str:
        """Raise a `RequestError` to refuse; return the session's user."""


def blob_id_field(request: dict[str, Any], name: str) -> str:
    value = v.get_bytes(request, name, max_len=32, min_len=32)
    return value.hex()


class BlobStream:
    """One blob_put or blob_get stream; the transport feeds it and resets it."""

    def __init__(self, transfers: BlobTransfers, request: dict[str, Any],
                 conn: ConnectionState, sink: StreamSink, decoder: FrameDecoder) -> None:
        self._t = transfers
        self._sink = sink
        self._decoder = decoder
        self._op = str(request.get("op"))
        self._started = time.perf_counter()
        self._upload: Upload | None = None
        self._task: asyncio.Task[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self.finished = False
        try:
            user = transfers.authorizer.authorize_stream(request, conn)
            if self._op == "blob_put":
                self._start_upload(user, request)
            else:
                self._start_download(user, request)
        except Exception as exc:
            self._fail(exc)

    # -- outcome -----------------------------------------------------------------------
    def _observe(self) -> None:
        self._t.dispatcher.observe(self._op, time.perf_counter() - self._started)

    def _cancel_timers(self) -> None:
        for timer in (self._idle, self._deadline):
            if timer is not None:
                timer.cancel()

    def _reply(self, response: dict[str, Any]) -> None:
        self.finished = True
        self._cancel_timers()
        self._sink.send(encode_frame(response), end=True)
        self._observe()

    def _fail(self, exc: BaseException) -> None:
        if self._upload is not None:
            self._upload.abort()
        if not isinstance(exc, RequestError):
            log.error("blob transfer failed", extra={"op": self._op, "error": repr(exc)})
            exc = Internal("internal error")
        self._reply(self._t.dispatcher.error_response(self._op, exc))
        self._sink.stop_receiving()

    def reset(self) -> None:
        """The peer reset the stream or the connection went away: drop partial work."""
        if self._upload is not None:
            self._upload.abort()
        if self._task is not None:
            self._task.cancel()
        self._cancel_timers()
        self.finished = True

    # -- upload ------------------------------------------------------------------------
    def _start_upload(self, user: str, request: dict[str, Any]) -> None:
        store = self._t.store
        blob_id = blob_id_field(request, "sha256")
        size = v.get_int(request, "size", lo=1, hi=2**53)
        existing = store.visible_to(blob_id, user)
        if existing is not None:  # same ciphertext already held: nothing to transfer
            self._reply({"ok": True, "blob_id": bytes.fromhex(blob_id), "size": existing.size,
                         "existing": True})
            self._sink.stop_receiving()
            return
        # Someone else's identical blob is not revealed: the upload runs in full, and
        # proving the bytes is what lets this user reference it.
        self._upload = store.begin_upload(user, blob_id, size)
        self._arm_idle()
        deadline = self._t.upload_deadline_s
        self._deadline = asyncio.get_running_loop().call_later(
            deadline, self._overdue, deadline)

    def _overdue(self, deadline: float) -> None:
        """However slowly it trickles, an upload holds a descriptor for a bounded time."""
        if not self.finished and self._task is None:
            self._fail(UploadStalled(f"upload not finished within {deadline:g}s; discarded"))

    def _arm_idle(self) -> None:
        """A stalled upload would hold a temp file and quota until the connection idles
        out; refuse it after [blobs] upload_idle_timeout_s without data instead."""
        if self._idle is not None:
            self._idle.cancel()
        timeout = self._t.upload_idle_timeout_s
        self._idle = asyncio.get_running_loop().call_later(timeout, self._stalled, timeout)

    def _stalled(self, timeout: float) -> None:
        if not self.finished and self._task is None:
            self._fail(UploadStalled(f"no upload data for {timeout:g}s; upload discarded"))

    def feed(self, data: bytes, end: bool, decoded: Sequence[dict[str, Any]] = ()) -> None:
        """Stream bytes in (plus frames the transport decoded along with the request)."""
        if self.finished or self._upload is None or self._task is not None:
            return  # downloads need nothing more; refused uploads ignore the rest
        try:
            for frame in [*decoded, *self._decoder.feed(data)]:
                chunk = frame.get("chunk")
                if not isinstance(chunk, bytes) or len(frame) != 1:
                    raise BadRequest("after blob_put, every frame must be {'chunk': bytes}")
                self._upload.write(chunk)
            if end:
                self._decoder.finish()
                if self._idle is not None:
                    self._idle.cancel()
                self._task = asyncio.get_running_loop().create_task(self._commit())
            elif data:
                self._arm_idle()
        except Exception as exc:
            self._fail(exc)

    async def _commit(self) -> None:
        upload = self._upload
        assert upload is not None
        try:
            info = await upload.commit(self._t.clock())
        except Exception as exc:
            self._fail(exc)
            return
        log.info("blob stored", extra={"user": upload.owner, "size": info.size})
        self._reply({"ok": True, "blob_id": bytes.fromhex(info.blob_id), "size": info.size,
                     "existing": False})

    # -- download ----------------------------------------------------------------------
    def _start_download(self, user: str, request: dict[str, Any]) -> None:
        blob_id = blob_id_field(request, "blob_id")
        if request.get("device") is not None:  # each device fetches its own reference
            device = v.get_str(request, "device", max_len=16)
            if not re.fullmatch(r"[0-9a-f]{16}", device):
                raise BadRequest("field 'device' must be a device id (16 hex digits)")
            user = f"{user}/{device}"
        info = self._t.store.visible_to(blob_id, user)
        if info is None:
            raise NotFound("no such blob (never uploaded, or expired)")
        self._task = asyncio.get_running_loop().create_task(
            self._send_blob(user, blob_id, info.size))

    async def _send_blob(self, user: str, blob_id: str, size: int) -> None:
        chunk_bytes = self._t.chunk_bytes
        try:
            with open(self._t.store.path_for(blob_id), "rb") as f:
                if not self._sink.send(encode_frame({"ok": True, "size": size})):
                    return
                sent = 0
                while sent < size:
                    chunk = await asyncio.to_thread(f.read, chunk_bytes)
                    if not chunk:
                        raise Internal("blob file is shorter than its record")
                    if not self._sink.send(encode_frame({"chunk": chunk})):
                        return  # the client went away
                    sent += len(chunk)
                    while self._sink.unacked_bytes() > _SEND_WINDOW:
                        if self._sink.closed:
                            return
                        await asyncio.sleep(0.005)
        except FileNotFoundError:
            self._fail(NotFound("no such blob (expired)"))
            return
        except asyncio.CancelledError:
            return
        except Exception as exc:
            log.error("blob download failed", extra={"error": repr(exc)})
            with contextlib.suppress(Exception):
                self._sink.send(b"", end=True)
            self.finished = True
            return
        self._sink.send(b"", end=True)
        self.finished = True
        self._observe()
        await self._t.store.downloaded(blob_id, user)


class BlobTransfers:
    def __init__(self, authorizer: StreamAuthorizer, dispatcher: Dispatcher, store: BlobStore,
                 max_frame_bytes: int, chunk_bytes: int, upload_idle_timeout_s: float = 60.0,
                 upload_deadline_s: float = 3600.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.upload_deadline_s = upload_deadline_s
        self.authorizer = authorizer
        self.dispatcher = dispatcher
        self.clock = clock
        self.store = store
        self.chunk_bytes = max(1024, min(chunk_bytes, max_frame_bytes - _FRAME_OVERHEAD))
        self.upload_idle_timeout_s = upload_idle_timeout_s

    def open_stream(self, request: dict[str, Any], conn: ConnectionState, sink: StreamSink,
                    decoder: FrameDecoder) -> BlobStream:
        return BlobStream(self, request, conn, sink, decoder)


def blob_ops() -> Mapping[str, Handler]:
    """What the dispatcher answers for blob ops: transports that give a request its own
    stream (QUIC) serve them before dispatch; the others refuse them clearly."""
    async def needs_stream(request: dict[str, Any], conn: ConnectionState) -> dict[str, Any]:
        raise BadRequest(f"{request.get('op')} streams its data and needs a QUIC stream of "
                         "its own; it is not available on this transport")

    return dict.fromkeys(BLOB_OPS, needs_stream)
