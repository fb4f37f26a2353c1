"""Hypothesis strategies for qpq frames, built from the protocol's own types.

Requests are maps of the fields the handlers read (see qpq_server/service.py and
protocol/validate.py), each drawn either well-typed or as any msgpack value, so that
the generated frames reach past the decoder into field validation and the handlers.
Mutations then work on the encoded bytes.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

# The ops a client can send, and the fields handlers read with their intended types.
OPS = [
    "hello", "ping", "register_start", "register_finish", "login_start", "login_finish",
    "passwd_start", "passwd_finish", "reregister_start", "reregister_finish", "logout",
    "publish_keys", "get_keys", "enqueue", "fetch", "ack", "kt_head", "kt_lookup",
    "kt_consistency", "kt_inclusion", "blob_put", "blob_get",
    "devices", "link_start", "device_endorse", "unlink",
]

usernames = st.from_regex(r"\A[A-Za-z0-9._-]{1,64}\Z")

# Any value msgpack can carry (what a hostile client can put in a field).
msgpack_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True) | st.text(max_size=40) | st.binary(max_size=64),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)

FIELD_TYPES: dict[str, st.SearchStrategy[Any]] = {
    "token": st.text(max_size=80),
    "session": st.text(max_size=200),
    "username": usernames,
    "request": st.binary(max_size=200),
    "upload": st.binary(max_size=300),
    "finalization": st.binary(max_size=120),
    "login_id": st.integers(min_value=-1, max_value=2**64 - 1),
    "identity_key": st.binary(min_size=31, max_size=33),
    "key_packages": st.lists(st.binary(max_size=64), max_size=5),
    "recipients": st.lists(usernames, max_size=5),
    "payload": st.binary(max_size=256),
    "device": st.text(alphabet="0123456789abcdef", min_size=15, max_size=17) | st.text(
        max_size=20),
    "target": st.text(alphabet="0123456789abcdef", min_size=16, max_size=16),
    "verifier_hash": st.binary(min_size=31, max_size=33),
    "link_code": st.binary(min_size=31, max_size=33),
    "link_mac": st.binary(min_size=31, max_size=33),
    "signature": st.binary(min_size=63, max_size=65),
    "blobs": st.lists(st.binary(min_size=31, max_size=33), max_size=3),
    "ids": st.lists(st.integers(min_value=-5, max_value=2**63), max_size=8),
    "ack": st.lists(st.integers(min_value=-5, max_value=2**63), max_size=8),  # on fetch
    "limit": st.integers(min_value=-1, max_value=1000),
    "wait_s": st.floats(min_value=-1.0, max_value=0.0) | st.just(0.0),
    "first": st.integers(min_value=-1, max_value=10),
    "second": st.integers(min_value=-1, max_value=10),
    "blob_id": st.binary(min_size=31, max_size=33),
    "size": st.integers(min_value=-1, max_value=2**40),
}


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """One request map: a real op (or garbage) and some fields, typed or hostile."""
    op = draw(st.sampled_from(OPS) | msgpack_values)
    request: dict[str, Any] = {"op": op}
    for name in draw(st.lists(st.sampled_from(sorted(FIELD_TYPES)), max_size=6, unique=True)):
        request[name] = draw(FIELD_TYPES[name] | msgpack_values)
    return request


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with a few byte-level edits: flips, inserts, deletes, truncation, splices."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "dup"]))
        at = draw(st.integers(min_value=0, max_value=max(len(buf) - 1, 0)))
        if kind == "flip" and buf:
            buf[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif kind == "set" and buf:
            buf[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC1, 0xDC, 0xDD, 0xDE, 0xDF,
                                            0xC4, 0xC5, 0xC6, 0xD9, 0xDB, 0xFF]))
        elif kind == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and buf:
            del buf[at:at + draw(st.integers(min_value=1, max_value=8))]
        elif kind == "truncate":
            del buf[at:]
        elif kind == "dup" and buf:
            buf[at:at] = buf[at:at + draw(st.integers(min_value=1, max_value=16))]
    return bytes(buf)
