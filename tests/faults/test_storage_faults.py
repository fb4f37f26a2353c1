"""The N-th storage write fails, for N = 1..50, under a messaging workload.

In process (the real dispatch core on a real SQLCipher file, storage wrapped by
tests/helpers/faulty_storage.py). For every N: the request whose write failed gets an
error and no ack, the server keeps answering, and every message that *was* acked is
delivered (exactly once across fetch + ack) afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import opaque_ke_py as opaque
import pytest

from qpq_server.protocol.dispatch import ConnectionState
from tests.helpers.dispatch import Harness, harness
from tests.helpers.faulty_storage import FaultyStorage

ROUNDS = range(1, 51)


@pytest.fixture
async def faulty(tmp_path: Path) -> AsyncIterator[tuple[Harness, FaultyStorage]]:
    wrappers: list[FaultyStorage] = []

    def wrap(inner: Any) -> Any:
        wrappers.append(FaultyStorage(inner))
        return wrappers[-1]

    async for h in harness(tmp_path, wrap, rate_limit={"enabled": False}):
        yield h, wrappers[0]


async def _ok_or_failed(h: Harness, conn: ConnectionState, op: str,
                        **fields: Any) -> dict[str, Any] | None:
    """The answer when ok; None when the injected fault refused it (checked clean)."""
    r = await h.call(conn, op, **fields)
    if r["ok"]:
        return r
    assert r["error"]["code"] == "internal", r  # no detail leaks, no crash
    assert "injected" not in r["error"]["message"]
    return None


async def _until_ok(h: Harness, conn: ConnectionState, op: str, **fields: Any) -> dict[str, Any]:
    for _ in range(3):  # one fault per round: the retry goes through
        r = await _ok_or_failed(h, conn, op, **fields)
        if r is not None:
            return r
    raise AssertionError(f"{op} kept failing")


async def _workload(h: Harness, conn: ConnectionState, sender: str, tag: str,
                    ) -> tuple[str, dict[int, bytes], set[int]]:
    """Register a fresh recipient, send it 42 messages, fetch and ack some on the way
    (51 writes or more). Returns the recipient's session, the messages acked to the
    sender and not yet to the recipient, and ids the recipient acked (never again)."""
    user = f"r{tag}"
    while True:  # a failed register_finish stored nothing: register again
        start = opaque.client_registration_start(b"pw")
        r = await _until_ok(h, conn, "register_start", username=user,
                            request=start.get_message())
        finish = opaque.client_registration_finish(b"pw", start.get_state(), r["response"])
        if await _ok_or_failed(h, conn, "register_finish", username=user,
                               upload=finish.get_message()) is not None:
            break
    recipient = str((await h.login(conn, user, b"pw"))["session"])
    pending: dict[int, bytes] = {}
    acked: set[int] = set()
    for i in range(42):
        payload = f"{tag}:{i}".encode()
        r = await _ok_or_failed(h, conn, "enqueue", session=sender, recipients=[user],
                                payload=payload)
        if r is not None:
            pending[int(r["ids"][0])] = payload
        if i % 5 == 4:
            got = await _until_ok(h, conn, "fetch", session=recipient)
            ids = [int(m["id"]) for m in got["messages"]]
            assert ids == sorted(pending), "fetch lost or invented a message"
            assert not set(ids) & acked
            a = await _ok_or_failed(h, conn, "ack", session=recipient, ids=ids[:2])
            if a is not None:
                for msg_id in ids[:2]:
                    acked.add(msg_id)
                    pending.pop(msg_id)
    return recipient, pending, acked


async def test_nth_write_fails_nothing_acked_is_lost(
        faulty: tuple[Harness, FaultyStorage]) -> None:
    h, storage = faulty
    conn = await h.connect()
    sender = await h.session(conn, "sender")
    for n in ROUNDS:
        storage.fail_nth(n)
        recipient, pending, acked = await _workload(h, conn, sender, str(n))
        assert storage.injected == n, f"round {n}: the fault was not reached"
        storage.fail_nth(None)
        assert (await h.call(conn, "ping"))["ok"]  # the server stays up
        got = await h.call(conn, "fetch", session=recipient)
        delivered = {int(m["id"]): m["payload"] for m in got["messages"]}
        assert delivered == pending, f"round {n}: acked messages lost or duplicated"
        assert not delivered.keys() & acked
        assert (await h.call(conn, "ack", session=recipient, ids=list(delivered)))["ok"]
        assert (await h.call(conn, "fetch", session=recipient))["messages"] == []
    assert storage.injected == len(ROUNDS)
