"""The dispatch core in process: a real Service on a real SQLCipher file, no sockets.

Every op and every error code a request can get from `Dispatcher.handle` is exercised
here in milliseconds; the transports' own tests (test_messaging, test_bad_input…) cover
the same paths over QUIC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import opaque_ke_py as opaque
import pytest

from qpq_server.devices import device_id
from qpq_server.errors import QpqError, RequestError
from qpq_server.protocol.dispatch import ConnectionState, Request, Response
from tests.helpers.dispatch import PASSWORD, Harness, code
from tests.helpers.dispatch import harness as _harness


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in _harness(tmp_path, rate_limit={"enabled": False}):
        yield harness


# -- the happy path ---------------------------------------------------------------------

async def test_a_new_identity_needs_a_login_on_this_connection_within_the_window(
        h: Harness) -> None:
    conn = await h.connect()
    carol = await h.session(conn, "carol")
    first = await h.call(conn, "publish_keys", session=carol, identity_key=b"a" * 64,
                         key_packages=[])
    assert first["ok"], first
    h.clock.now += 121  # the password proof on this connection has gone stale
    stale = await h.call(conn, "publish_keys", session=carol, identity_key=b"b" * 64,
                         key_packages=[])
    assert code(stale) == "proof_required"
    other = await h.connect()  # a session carried to another connection proves nothing
    assert code(await h.call(other, "publish_keys", session=carol, identity_key=b"b" * 64,
                             key_packages=[])) == "proof_required"
    assert (await h.login(conn, "carol"))["ok"]
    again = await h.call(conn, "publish_keys", session=carol, identity_key=b"b" * 64,
                         key_packages=[])  # a second device also needs a link code
    assert code(again) == "link_required", again



async def test_register_login_enqueue_fetch_ack_in_process(h: Harness) -> None:
    conn = await h.connect()
    alice = await h.session(conn, "alice")
    bob = await h.session(conn, "bob")
    published = await h.call(conn, "publish_keys", session=bob, identity_key=b"k" * 64,
                             key_packages=[b"p1", b"p2"])
    assert published == {"ok": True, "key_packages": 2, "devices": 1,
                         "device": device_id(b"k" * 64)}
    keys = await h.call(conn, "get_keys", session=alice, username="bob")
    assert keys["identity_key"] == b"k" * 64 and keys["key_package"] == b"p1"
    assert keys["kt"]["leaf_index"] == 0

    sent = await h.call(conn, "enqueue", session=alice, recipients=["bob", "bob"],
                        payload=b"ciphertext")
    assert sent["ok"] and len(sent["ids"]) == 1  # duplicate recipients merged
    fetched = await h.call(conn, "fetch", session=bob)
    assert [(m["from"], m["payload"]) for m in fetched["messages"]] == [("alice", b"ciphertext")]
    assert (await h.call(conn, "ack", session=bob, ids=sent["ids"]))["deleted"] == 1
    assert (await h.call(conn, "fetch", session=bob))["messages"] == []
    assert h.metrics.registry.get_sample_value("qpq_enqueue_total") == 1


async def test_kt_ops_are_registered_beside_the_core(h: Harness) -> None:
    conn = await h.connect()
    head = await h.call(conn, "kt_head")
    assert head["ok"] and head["head"]["size"] == 0
    assert {"hello", "enqueue", "kt_lookup", "blob_put"} <= h.dispatcher.ops


async def test_a_feature_cannot_take_an_op_another_registered(h: Harness) -> None:
    async def again(request: Request, conn: ConnectionState) -> Response:
        return {}

    with pytest.raises(ValueError, match="registered twice: enqueue"):
        h.dispatcher.register({"enqueue": again})


# -- every error code handle() can answer -------------------------------------------------

@pytest.mark.parametrize("op", [None, 7, [], {}, b"enqueue"])
async def test_op_of_the_wrong_type_is_bad_request(h: Harness, op: Any) -> None:
    conn = await h.connect()
    assert code(await h.call(conn, op)) == "bad_request"
    assert h.errors("unknown", "bad_request") >= 1


async def test_unknown_op_is_bad_request_under_one_label(h: Harness) -> None:
    conn = await h.connect()
    response = await h.call(conn, "x" * 500)
    assert code(response) == "bad_request" and len(response["error"]["message"]) < 120
    assert h.errors("unknown", "bad_request") == 1


async def test_ops_before_hello_and_a_wrong_token_are_unauthenticated(h: Harness) -> None:
    conn = ConnectionState(peer="127.0.0.1")
    assert code(await h.call(conn, "fetch", session="x")) == "unauthenticated"
    assert code(await h.call(conn, "hello", token="wrong")) == "unauthenticated"
    assert not conn.authenticated


async def test_tampered_and_expired_sessions_are_invalid(h: Harness) -> None:
    conn = await h.connect()
    session = await h.session(conn, "alice")
    tampered = session[:-2] + ("AA" if not session.endswith("AA") else "BB")
    assert code(await h.call(conn, "fetch", session=tampered)) == "invalid_session"
    h.clock.now += h.core.service.config.server.session_ttl_s + 1
    assert code(await h.call(conn, "fetch", session=session)) == "invalid_session"


async def test_wrong_password_and_replayed_finalization_fail_login(h: Harness) -> None:
    conn = await h.connect()
    await h.register(conn, "alice")
    assert code(await h.login(conn, "alice", b"not the password")) == "login_failed"
    assert code(await h.login(conn, "nobody")) == "login_failed"
    start = opaque.client_login_start(PASSWORD)
    r = await h.call(conn, "login_start", username="alice", request=start.get_message())
    finish = opaque.client_login_finish(PASSWORD, start.get_state(), r["response"])
    first = await h.call(conn, "login_finish", login_id=r["login_id"],
                         finalization=finish.get_message())
    assert first["ok"]
    replay = await h.call(conn, "login_finish", login_id=r["login_id"],
                          finalization=finish.get_message())
    assert code(replay) == "login_failed"


async def test_duplicate_registration_is_user_exists(h: Harness) -> None:
    conn = await h.connect()
    await h.register(conn, "alice")
    start = opaque.client_registration_start(PASSWORD)
    r = await h.call(conn, "register_start", username="alice", request=start.get_message())
    finish = opaque.client_registration_finish(PASSWORD, start.get_state(), r["response"])
    response = await h.call(conn, "register_finish", username="alice",
                            upload=finish.get_message())
    assert code(response) == "user_exists"


async def test_unknown_users_and_unpublished_keys(h: Harness) -> None:
    conn = await h.connect()
    alice = await h.session(conn, "alice")
    await h.session(conn, "bob")
    assert code(await h.call(conn, "enqueue", session=alice, recipients=["carol"],
                             payload=b"x")) == "unknown_user"
    assert code(await h.call(conn, "get_keys", session=alice,
                             username="carol")) == "unknown_user"
    assert code(await h.call(conn, "get_keys", session=alice, username="bob")) == "not_found"


@pytest.mark.parametrize(("fields", "expected"), [
    ({"recipients": []}, "bad_request"),
    ({"recipients": "bob"}, "bad_request"),
    ({"recipients": [1]}, "bad_request"),
    ({"payload": "text, not bytes"}, "bad_request"),
    ({"payload": b"x" * (1048576 + 1)}, "too_large"),
    ({"recipients": ["bob"] * 101}, "too_large"),
    ({"blobs": [b"\x00" * 32]}, "not_found"),
])
async def test_malformed_enqueue_fields(h: Harness, fields: dict[str, Any],
                                        expected: str) -> None:
    conn = await h.connect()
    alice = await h.session(conn, "alice")
    await h.session(conn, "bob")
    request = {"session": alice, "recipients": ["bob"], "payload": b"x", **fields}
    assert code(await h.call(conn, "enqueue", **request)) == expected
    assert h.errors("enqueue", expected) == 1


async def test_streamed_ops_over_dispatch_say_they_need_a_stream(h: Harness) -> None:
    conn = await h.connect()
    response = await h.call(conn, "blob_get", session="x", blob_id=b"\x00" * 32)
    assert code(response) == "bad_request" and "stream" in response["error"]["message"]


async def test_kt_consistency_outside_the_log_is_bad_request(h: Harness) -> None:
    conn = await h.connect()
    assert code(await h.call(conn, "kt_consistency", first=0, second=5)) == "bad_request"


async def test_draining_refuses_enqueue_with_server_busy(h: Harness) -> None:
    conn = await h.connect()
    alice = await h.session(conn, "alice")
    await h.session(conn, "bob")
    h.core.service.draining = True
    assert code(await h.call(conn, "enqueue", session=alice, recipients=["bob"],
                             payload=b"x")) == "server_busy"


async def test_rate_limits_answer_rate_limited(tmp_path: Path) -> None:
    async for h in _harness(tmp_path, rate_limit={"address_burst": 3,
                                                  "address_rate_per_s": 0.001}):
        conn = await h.connect()
        answers = [await h.call(conn, "ping") for _ in range(3)]
        assert [a["ok"] for a in answers] == [True, True, False]
        assert code(answers[-1]) == "rate_limited"
        other = ConnectionState(peer="127.0.0.2")  # the limit is per address
        assert (await h.call(other, "hello", token=h.token))["ok"]


async def test_unexpected_failures_answer_internal_and_count(h: Harness) -> None:
    async def broken(request: Request, conn: ConnectionState) -> Response:
        raise RuntimeError("a bug")

    async def storage_gone(request: Request, conn: ConnectionState) -> Response:
        raise QpqError("storage went away")

    h.dispatcher.register({"broken": broken, "storage_gone": storage_gone})
    conn = await h.connect()
    for op in ("broken", "storage_gone"):
        response = await h.call(conn, op)
        assert code(response) == "internal"
        assert "a bug" not in response["error"]["message"]
        assert h.errors(op, "internal") == 1


async def test_error_response_is_the_one_shape_transports_send(h: Harness) -> None:
    body = h.dispatcher.error_response("frame", RequestError("nope"))
    assert body == {"ok": False, "error": {"code": "bad_request", "message": "nope"}}
    assert h.errors("frame", "bad_request") == 1


async def test_a_spurious_wake_up_does_not_end_a_long_poll(h: Harness) -> None:
    """A reconnecting notifier may wake every waiter with nothing to deliver: the fetch
    parks again until its wait is over, and still gets what arrives later."""
    import asyncio

    conn = await h.connect()
    alice = await h.session(conn, "alice")
    bob = await h.session(conn, "bob")
    parked = asyncio.ensure_future(h.call(conn, "fetch", session=bob, wait_s=10.0))
    for _ in range(100):  # until it is parked
        if h.core.service.notifier.waiting:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    h.core.service.notifier.notify(["bob"])  # nothing was enqueued
    await asyncio.sleep(0.1)
    assert not parked.done()
    await h.call(conn, "enqueue", session=alice, recipients=["bob"], payload=b"later")
    answer = await asyncio.wait_for(parked, 5)
    assert [m["payload"] for m in answer["messages"]] == [b"later"]
