"""Hostile and malformed input: each gets a stable error code; the server keeps serving."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest

from qpq_server.client import ClientError
from qpq_server.client.connection import QpqConnection
from qpq_server.protocol.codec import encode_frame
from tests.helpers.server import RunningServer
from tests.server.conftest import ClientFactory, raw_connection


async def send_raw(conn: QpqConnection, data: bytes) -> dict[str, Any]:
    return await conn.protocol.send_raw(data)


def error_code(response: dict[str, Any]) -> str:
    assert response["ok"] is False, response
    return str(response["error"]["code"])


async def assert_still_serving(conn: QpqConnection) -> None:
    assert (await conn.call("ping"))["ok"] is True


async def test_garbage_bytes_get_bad_frame(server: RunningServer) -> None:
    async with raw_connection(server) as conn:
        body = b"\xc1\xc1\xc1 not msgpack"
        response = await send_raw(conn, struct.pack(">I", len(body)) + body)
        assert error_code(response) == "bad_frame"
        await assert_still_serving(conn)


async def test_truncated_frame_gets_bad_frame(server: RunningServer) -> None:
    async with raw_connection(server) as conn:
        response = await send_raw(conn, encode_frame({"op": "ping"})[:-3])
        assert error_code(response) == "bad_frame"
        await assert_still_serving(conn)


async def test_oversize_frame_gets_too_large_and_connection_survives(
        server: RunningServer) -> None:
    async with raw_connection(server) as conn:
        response = await send_raw(conn, struct.pack(">I", 50_000_000) + b"x" * 100)
        assert error_code(response) == "too_large"
        big = encode_frame({"op": "ping", "pad": b"x" * 1_100_000})
        response = await send_raw(conn, big)
        assert error_code(response) == "too_large"
        await assert_still_serving(conn)


async def test_non_map_body_gets_bad_frame(server: RunningServer) -> None:
    async with raw_connection(server) as conn:
        body = msgpack.packb(["op", "ping"])
        assert error_code(await send_raw(conn, struct.pack(">I", len(body)) + body)) == "bad_frame"
        await assert_still_serving(conn)


@pytest.mark.parametrize(("request_", "code"), [
    ({"op": "no_such_op"}, "bad_request"),
    ({"op": 42}, "bad_request"),
    ({"nop": "ping"}, "bad_request"),
    ({"op": "register_start", "username": 5, "request": b"x"}, "bad_request"),
    ({"op": "register_start", "username": "bad name!", "request": b"x"}, "bad_request"),
    ({"op": "register_start", "username": "u", "request": "not-bytes"}, "bad_request"),
    ({"op": "register_start", "username": "u", "request": b"x" * 5000}, "too_large"),
    ({"op": "register_start", "username": "u", "request": b"short"}, "login_failed"),
    ({"op": "login_finish", "login_id": "1", "finalization": b"x"}, "bad_request"),
    ({"op": "login_finish", "login_id": 999, "finalization": b"x"}, "login_failed"),
    ({"op": "fetch", "session": 12}, "bad_request"),
    ({"op": "fetch", "session": "forged.token"}, "invalid_session"),
    ({"op": "enqueue", "session": "a.b", "recipients": "bob", "payload": b""},
     "invalid_session"),
])
async def test_malformed_requests_get_stable_error_codes(
        server: RunningServer, request_: dict[str, Any], code: str) -> None:
    async with raw_connection(server) as conn:
        assert error_code(await conn.call_raw(request_)) == code
        await assert_still_serving(conn)


async def test_requests_before_hello_are_unauthenticated(server: RunningServer) -> None:
    async with raw_connection(server, hello=False) as conn:
        assert error_code(await conn.call_raw({"op": "ping"})) == "unauthenticated"
        assert error_code(await conn.call_raw({"op": "hello"})) == "bad_request"
        assert error_code(await conn.call_raw({"op": "hello", "token": "wrong"})) \
            == "unauthenticated"
        assert error_code(await conn.call_raw({"op": "ping"})) == "unauthenticated"
        assert (await conn.call("hello", token=server.auth_token))["ok"]
        await assert_still_serving(conn)


async def test_wrong_token_at_connect_is_refused(server: RunningServer) -> None:
    with pytest.raises(ClientError) as err:
        async with raw_connection(server, token="not-the-token"):
            pass
    assert err.value.code == "unauthenticated"


async def test_wrong_password_and_unknown_user_look_the_same(
        server: RunningServer, client: ClientFactory) -> None:
    async with client() as c:
        await c.register("bi_alice", "right password")
        with pytest.raises(ClientError) as wrong_pw:
            await c.login("bi_alice", "wrong password")
        with pytest.raises(ClientError) as unknown:
            await c.login("bi_nobody", "any password")
        assert wrong_pw.value.code == unknown.value.code == "login_failed"
        assert str(wrong_pw.value) == str(unknown.value)
        await assert_still_serving(c.conn)


async def test_replayed_login_finalization_is_refused(server: RunningServer,
                                                      client: ClientFactory) -> None:
    import opaque_ke_py as opaque

    async with client() as c:
        await c.register("replay_u", "pw")
        start = opaque.client_login_start(b"pw")
        resp = await c.conn.call("login_start", username="replay_u", request=start.get_message())
        finish = opaque.client_login_finish(b"pw", start.get_state(), resp["response"])
        ok = await c.conn.call("login_finish", login_id=resp["login_id"],
                               finalization=finish.get_message())
        assert ok["session"]
        replay = await c.conn.call_raw({"op": "login_finish", "login_id": resp["login_id"],
                                        "finalization": finish.get_message()})
        assert error_code(replay) == "login_failed"


async def test_tampered_session_token_is_refused(server: RunningServer,
                                                 client: ClientFactory) -> None:
    async with client() as c:
        await c.register("tamper_u", "pw")
        token = c.profile("tamper_u").session
        assert token is not None
        body, mac = token.split(".")
        forged = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1] + "." + mac
        assert error_code(await c.conn.call_raw({"op": "fetch", "session": forged})) \
            == "invalid_session"


async def test_enqueue_to_unknown_user_is_refused(server: RunningServer,
                                                  client: ClientFactory) -> None:
    async with client() as c:
        await c.register("eu_alice", "pw")
        session = c.profile("eu_alice").session
        response = await c.conn.call_raw({"op": "enqueue", "session": session,
                                          "recipients": ["eu_ghost"], "payload": b"x"})
        assert error_code(response) == "unknown_user"
        response = await c.conn.call_raw({"op": "enqueue", "session": session,
                                          "recipients": [], "payload": b"x"})
        assert error_code(response) == "bad_request"
        await assert_still_serving(c.conn)


async def test_duplicate_registration_is_refused(client: ClientFactory) -> None:
    async with client() as c:
        await c.register("dup_u", "pw")
        with pytest.raises(ClientError) as err:
            await c.register("dup_u", "other")
        assert err.value.code == "user_exists"


async def test_errors_are_counted_by_op_and_code(server: RunningServer) -> None:
    import httpx

    async with raw_connection(server) as conn:
        await conn.call_raw({"op": "definitely_unknown"})
    text = httpx.get(server.metrics_url + "/metrics").text
    assert 'qpq_rpc_errors_total{code="bad_request",op="unknown"}' in text
