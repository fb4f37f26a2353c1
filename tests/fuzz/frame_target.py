"""The fuzz target for the frame decoder and request validation (atheris or replay).

`one_input(data)` treats the first byte as a chunk size, feeds the rest to a
`FrameDecoder` in such chunks and runs every field validator over every decoded frame.
Anything escaping but the qpq error tree is a bug. Run it under atheris with

    .venv/bin/python -m tests.fuzz.frame_target CORPUS_DIR -max_total_time=60

(the `make soak` target does); `test_fuzz_corpus.py` replays the committed corpus and
runs a short fixed budget in `make test`.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Any

from qpq_server.errors import QpqError
from qpq_server.protocol import codec
from qpq_server.protocol import validate as v
from qpq_server.protocol.codec import FrameDecoder

MAX_FRAME = 64 * 1024
FIELDS = ("op", "token", "session", "username", "request", "upload", "finalization",
          "login_id", "identity_key", "key_packages", "recipients", "payload", "blobs",
          "ids", "limit", "wait_s", "blob_id")

CHECKS: tuple[Any, ...] = (
    lambda r, n: v.get_str(r, n, max_len=512),
    lambda r, n: v.get_username(r, n),
    lambda r, n: v.get_bytes(r, n, max_len=MAX_FRAME, min_len=1),
    lambda r, n: v.get_optional_bytes(r, n, max_len=32, min_len=32),
    lambda r, n: v.get_int(r, n, lo=0, hi=2**63),
    lambda r, n: v.get_int(r, n, lo=1, hi=500, default=500),
    lambda r, n: v.get_float(r, n, lo=0.0, hi=30.0, default=0.0),
    lambda r, n: v.get_str_list(r, n, max_items=100),
    lambda r, n: v.get_bytes_list(r, n, max_items=100, max_len=4096),
    lambda r, n: v.get_int_list(r, n, max_items=500),
)


def one_input(data: bytes) -> None:
    if not data:
        return
    chunk = data[0] or 1
    body = data[1:]
    decoder = FrameDecoder(MAX_FRAME)
    try:
        for at in range(0, len(body), chunk):
            for frame in decoder.feed(body[at:at + chunk]):
                for name in FIELDS:
                    for check in CHECKS:
                        with contextlib.suppress(QpqError):
                            check(frame, name)
        decoder.finish()
    except QpqError:
        pass


def main() -> None:
    import atheris  # only under the fuzzer: replay needs no atheris

    # Coverage of the decoder and the validators only: instrument_all() would rewrite
    # every loaded module and take a minute before the first input.
    for module in (codec, v):
        for value in list(vars(module).values()):
            if getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(value):
                atheris.instrument_func(value)
            elif inspect.isclass(value):
                for member in vars(value).values():
                    if inspect.isfunction(member):
                        atheris.instrument_func(member)
    atheris.instrument_func(one_input)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
