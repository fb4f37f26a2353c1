"""The sans-I/O frame codec, without sockets."""

from __future__ import annotations

import struct

import msgpack
import pytest

from qpq_server.errors import BadFrame, TooLarge
from qpq_server.protocol.codec import FrameDecoder, encode_frame


def test_round_trip_across_arbitrary_chunking() -> None:
    frames = [{"op": "ping", "n": i, "blob": bytes(i)} for i in range(5)]
    data = b"".join(encode_frame(f) for f in frames)
    decoder = FrameDecoder(max_frame_bytes=4096)
    out = []
    for i in range(0, len(data), 3):
        out += decoder.feed(data[i : i + 3])
    assert out == frames
    decoder.finish()


def test_declared_oversize_length_is_refused_before_buffering() -> None:
    decoder = FrameDecoder(max_frame_bytes=1024)
    with pytest.raises(TooLarge):
        decoder.feed(struct.pack(">I", 10_000_000))


def test_truncated_frame_is_reported_at_end_of_stream() -> None:
    decoder = FrameDecoder(max_frame_bytes=1024)
    assert decoder.feed(encode_frame({"op": "ping"})[:-2]) == []
    with pytest.raises(BadFrame):
        decoder.finish()


@pytest.mark.parametrize("body", [b"\xc1garbage", msgpack.packb([1, 2]), msgpack.packb({1: 2})])
def test_non_map_or_garbage_body_is_bad_frame(body: bytes) -> None:
    with pytest.raises(BadFrame):
        FrameDecoder(1024).feed(struct.pack(">I", len(body)) + body)
