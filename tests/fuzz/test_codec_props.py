"""Property tests of the frame decoder and field validation, and the msgpack bombs.

Frames are built from the protocol's own request shapes (tests/fuzz/strategies.py),
encoded, mutated at the byte level and fed to `FrameDecoder` in random chunks: the only
exceptions allowed out are the qpq error tree's. Known msgpack bombs are replayed with
tracemalloc watching: what a frame can make the decoder allocate is bounded by the
frame cap.
"""

from __future__ import annotations

import contextlib
import os
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpq_server.errors import QpqError, RequestError
from qpq_server.protocol import validate as v
from qpq_server.protocol.codec import (
    HEADER_BYTES,
    MAX_CONTAINERS,
    FrameDecoder,
    decode_body,
    encode_frame,
)
from tests.fuzz.strategies import FIELD_TYPES, msgpack_values, mutated, requests

SOAK = os.environ.get("QPQ_SOAK") == "1"
SCALE = 20 if SOAK else 1  # `make soak` runs twenty times the examples
CAP = 64 * 1024  # a small frame cap keeps each example fast; the bombs use the real 1 MiB
REAL_CAP = 1024 * 1024


def feed_all(data: bytes, cuts: list[int], cap: int = CAP) -> list[dict[str, Any]]:
    """Feed `data` to a decoder in pieces split at `cuts`, then end the stream."""
    decoder = FrameDecoder(cap)
    frames: list[dict[str, Any]] = []
    last = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        frames.extend(decoder.feed(data[last:cut]))
        last = max(last, cut)
    decoder.finish()
    return frames


@settings(max_examples=150 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests(), min_size=1, max_size=3), st.lists(st.integers(0, 10_000)))
def test_well_formed_frames_round_trip_in_any_chunking(reqs: list[dict[str, Any]],
                                                       cuts: list[int]) -> None:
    data = b"".join(encode_frame(r) for r in reqs)
    try:
        frames = feed_all(data, cuts)
    except RequestError:
        # Only legitimate refusals: a non-str map key nested is fine for msgpack, but a
        # frame over the cap is refused; nothing else.
        assert any(len(encode_frame(r)) - HEADER_BYTES > CAP for r in reqs)
        return
    assert len(frames) == len(reqs)


@settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_frames_raise_only_qpq_errors(data: st.DataObject) -> None:
    reqs = data.draw(st.lists(requests(), min_size=1, max_size=2))
    raw = data.draw(mutated(b"".join(encode_frame(r) for r in reqs)))
    cuts = data.draw(st.lists(st.integers(0, 10_000), max_size=4))
    try:
        frames = feed_all(raw, cuts)
    except QpqError:
        return
    for frame in frames:
        assert isinstance(frame, dict) and all(isinstance(k, str) for k in frame)


@settings(max_examples=200 * SCALE, deadline=None)
@given(st.binary(max_size=512))
def test_raw_bytes_as_a_body_raise_only_bad_frame(body: bytes) -> None:
    with contextlib.suppress(QpqError):
        assert isinstance(decode_body(body), dict)


# Every validator, each with the arguments a handler passes; values drawn hostile.
VALIDATORS = [
    lambda r, n: v.get_str(r, n, max_len=100),
    lambda r, n: v.get_username(r, n),
    lambda r, n: v.get_bytes(r, n, max_len=100, min_len=1),
    lambda r, n: v.get_optional_bytes(r, n, max_len=32, min_len=32),
    lambda r, n: v.get_int(r, n, lo=0, hi=2**63),
    lambda r, n: v.get_int(r, n, lo=1, hi=100, default=10),
    lambda r, n: v.get_float(r, n, lo=0.0, hi=30.0, default=0.0),
    lambda r, n: v.get_str_list(r, n, max_items=5),
    lambda r, n: v.get_bytes_list(r, n, max_items=5, max_len=32),
    lambda r, n: v.get_int_list(r, n, max_items=5),
]


@settings(max_examples=200 * SCALE, deadline=None)
@given(st.sampled_from(range(len(VALIDATORS))), st.sampled_from(sorted(FIELD_TYPES)),
       st.dictionaries(st.sampled_from(sorted(FIELD_TYPES)),
                       msgpack_values | st.sampled_from(list(FIELD_TYPES.values())).flatmap(
                           lambda s: s)))
def test_validators_raise_only_request_errors(index: int, name: str,
                                              request: dict[str, Any]) -> None:
    with contextlib.suppress(RequestError):
        VALIDATORS[index](request, name)


# -- msgpack bombs: small frames that claim or build huge structures ------------------------

def _header(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


BOMBS: dict[str, bytes] = {
    # Headers that *claim* huge containers: 5 bytes, 2^29 map entries / 4 GiB strings.
    "map32_2^29_entries": b"\xdf\x20\x00\x00\x00",
    "array32_max": b"\xdd\xff\xff\xff\xff",
    "bin32_4GiB": b"\xc6\xff\xff\xff\xff",
    "str32_4GiB": b"\xdb\xff\xff\xff\xff",
    "ext32_4GiB": b"\xc9\xff\xff\xff\xff\x01",
    "map_of_map32_claims": b"\x81\xa1x\xdf\xff\xff\xff\xff",
    # Deep nesting (msgpack's C unpacker has a fixed stack).
    "nested_arrays_100k": b"\x91" * 100_000 + b"\xc0",
    "nested_maps_100k": b"\x81\xa1k" * 30_000 + b"\xc0",
    # Structures that are really built: the cap is what bounds them.
    "one_byte_empty_lists": b"\x81\xa1x\xdd" + (REAL_CAP - 16).to_bytes(4, "big")
    + b"\x90" * (REAL_CAP - 16),
    "one_byte_empty_maps": b"\x81\xa1x\xdd" + (REAL_CAP - 16).to_bytes(4, "big")
    + b"\x80" * (REAL_CAP - 16),
    "duplicate_keys": b"\xde\xff\xff" + b"\xa1k\xc0" * 0xFFFF,
    # Scalars that each become a Python object (small ints <= -6, floats, uint16s).
    "negative_int8s": b"\x81\xa1x\xdd" + (REAL_CAP // 2 - 8).to_bytes(4, "big")
    + b"\xd0\x9c" * (REAL_CAP // 2 - 8),
    "float32s": b"\x81\xa1x\xdd" + (REAL_CAP // 5 - 8).to_bytes(4, "big")
    + b"\xca\x3f\x80\x00\x01" * (REAL_CAP // 5 - 8),
}

# What the decoder may allocate for one frame, as a multiple of the frame cap. Python
# objects cost more than their msgpack bytes: before codec.MAX_CONTAINERS a frame of
# one-byte empty maps cost 76x the cap; now containers stop at 5x, and the worst left is
# a frame of two-byte negative ints (~23x: a 32-byte int object and a pointer each),
# which only a typed decoder (msgspec) would avoid. A regression fails here.
PEAK_PER_CAP_BYTE = 25


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_msgpack_bombs_are_refused_or_bounded_by_the_frame_cap(name: str) -> None:
    frame = _header(BOMBS[name])
    tracemalloc.start()
    try:
        with contextlib.suppress(QpqError):
            feed_all(frame, [1, 3, 5], cap=REAL_CAP)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_PER_CAP_BYTE * REAL_CAP, f"{name}: peak {peak} bytes"


def test_a_header_over_the_cap_is_refused_before_any_body_arrives() -> None:
    decoder = FrameDecoder(REAL_CAP)
    with pytest.raises(RequestError, match="exceeds max_frame_bytes"):
        decoder.feed((REAL_CAP + 1).to_bytes(4, "big"))
    assert decoder.pending_bytes == 4


def test_a_full_fetch_page_decodes_and_one_container_more_than_the_budget_does_not() -> None:
    page = {"ok": True, "messages": [{"id": i, "from": "a", "payload": b"x", "sent_at": 1.0}
                                     for i in range(500)], "more": True}
    assert len(feed_all(encode_frame(page), [])[0]["messages"]) == 500
    too_many = {"x": [[] for _ in range(MAX_CONTAINERS)]}  # + the list + the top map
    with pytest.raises(RequestError, match="maps and arrays"):
        feed_all(encode_frame(too_many), [], cap=REAL_CAP)
