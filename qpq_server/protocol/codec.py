"""Length-prefixed msgpack frames: a 4-byte big-endian length, then a msgpack map.

Pure functions and an incremental decoder: bytes in, frames out. No I/O.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from qpq_server.errors import BadFrame, TooLarge

__all__ = ["HEADER_BYTES", "FrameDecoder", "decode_body", "encode_frame"]

HEADER_BYTES = 4
_HEADER = struct.Struct(">I")
MAX_CONTAINERS = 4096
"""Maps and arrays one frame may hold. A one-byte msgpack container becomes a 56-64 byte
Python object, so without this bound a frame of empty maps costs ~76x its size in
memory (issue 17's fuzz harness measured it); no request or response needs more (a full
fetch page is 500 message maps)."""


def encode_frame(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _HEADER.pack(len(body)) + bytes(body)


def decode_body(body: bytes) -> dict[str, Any]:
    """Decode one frame body; anything but a msgpack map with str keys is a BadFrame."""
    budget = MAX_CONTAINERS

    def count(container: Any) -> Any:
        # Called as each map or array is completed: stops a container bomb early.
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise BadFrame(f"frame holds more than {MAX_CONTAINERS} maps and arrays")
        return container

    try:
        # The body is already bounded by max_frame_bytes; msgpack's own limits keep
        # declared container sizes within the body.
        value = msgpack.unpackb(body, raw=False, strict_map_key=True,
                                list_hook=count, object_hook=count)
    except BadFrame:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BadFrame("frame body is not valid msgpack") from exc
    if not isinstance(value, dict):
        raise BadFrame("frame body must be a msgpack map")
    return value


class FrameDecoder:
    """Accumulates stream bytes and yields complete frames.

    Refuses a declared length above `max_frame_bytes` as soon as the header arrives,
    so a hostile length never makes us buffer it.
    """

    def __init__(self, max_frame_bytes: int) -> None:
        self._max = max_frame_bytes
        self._buffer = bytearray()

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer.extend(data)
        frames: list[dict[str, Any]] = []
        while len(self._buffer) >= HEADER_BYTES:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > self._max:
                raise TooLarge(f"frame of {length} bytes exceeds max_frame_bytes={self._max}")
            if len(self._buffer) < HEADER_BYTES + length:
                break
            body = bytes(self._buffer[HEADER_BYTES : HEADER_BYTES + length])
            del self._buffer[: HEADER_BYTES + length]
            frames.append(decode_body(body))
        return frames

    def finish(self) -> None:
        """Called at end of stream: leftover bytes mean a truncated frame."""
        if self._buffer:
            raise BadFrame(f"stream ended inside a frame ({len(self._buffer)} bytes left)")
