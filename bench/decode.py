"""One enqueue request decoded and validated: qpq's msgpack + hand validation against
msgspec's one-pass decode into a typed Struct, in one run.

    .venv/bin/pip install msgspec       # not a dependency: measured, not adopted
    .venv/bin/python bench/decode.py [--n N]

qpq path: `codec.decode_body` (msgpack with the container budget hooks) then the
`validate` getters `_enqueue` uses. msgspec path: `msgspec.msgpack.Decoder(Enqueue)`
with the same bounds as `Meta` constraints (a BadRequest-worthy value raises
`msgspec.ValidationError`).
"""

from __future__ import annotations

import argparse
import time
from typing import Annotated, Any

import msgpack

try:
    import msgspec
except ImportError:  # main() says how to install it
    msgspec = None

from qpq_server.protocol import validate as v
from qpq_server.protocol.codec import decode_body

MAX_FRAME = 1 << 20
MAX_RECIPIENTS = 100


def qpq_decode(body: bytes) -> tuple[str, list[str], bytes]:
    request = decode_body(body)
    return (v.get_str(request, "session", max_len=512),
            v.get_str_list(request, "recipients", max_items=MAX_RECIPIENTS),
            v.get_bytes(request, "payload", max_len=MAX_FRAME))


def bench(fn: Any, body: bytes, n: int) -> float:
    began = time.perf_counter()
    for _ in range(n):
        fn(body)
    return (time.perf_counter() - began) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="decodes per variant")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n must be >= 1")
    if msgspec is None:
        raise SystemExit("msgspec is not installed: .venv/bin/pip install msgspec")

    class Enqueue(msgspec.Struct):
        op: str
        session: Annotated[str, msgspec.Meta(max_length=512)]
        recipients: Annotated[list[Annotated[str, msgspec.Meta(max_length=4096)]],
                              msgspec.Meta(max_length=MAX_RECIPIENTS)]
        payload: Annotated[bytes, msgspec.Meta(max_length=MAX_FRAME)]

    decoder = msgspec.msgpack.Decoder(Enqueue)

    def msgspec_decode(body: bytes) -> tuple[str, list[str], bytes]:
        r = decoder.decode(body)
        return r.session, r.recipients, r.payload

    body = msgpack.packb({"op": "enqueue", "session": "s" * 120, "recipients": ["bob"],
                          "payload": b"x" * 200}, use_bin_type=True)
    assert qpq_decode(body) == msgspec_decode(body)
    for _ in range(3):  # interleaved: the machine is shared
        q, m = bench(qpq_decode, body, args.n), bench(msgspec_decode, body, args.n)
        print(f"msgpack + validate {q:6.2f} us   msgspec {m:6.2f} us   saved {q - m:5.2f} us "
              "per request")


if __name__ == "__main__":
    main()
