"""The WebSocket bridge: same RPC, token, sessions and rate limits as QUIC, real
`websockets` clients talking to QUIC clients, and bad messages closing cleanly."""

from __future__ import annotations

import asyncio
import itertools
import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from qpq_server.client import ClientError, QpqClient
from qpq_server.devserver import RunningServer, await_until, free_port, running_server


@pytest.fixture(scope="module")
def ws_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    port = free_port()
    with running_server(tmp_path_factory.mktemp("wssrv"), overrides={
            "websocket": {"enabled": True, "listen": f"127.0.0.1:{port}"},
            "rate_limit": {"address_burst": 300, "address_rate_per_s": 50.0,
                           "account_burst": 300, "account_rate_per_s": 50.0}}) as srv:
        yield srv


def ws_url(srv: RunningServer) -> str:
    return "ws://" + tomllib.loads(srv.config_path.read_text())["websocket"]["listen"]


class WsConnection:
    """Duck-types QpqConnection (call, call_raw, timeout, server) over a WebSocket,
    matching responses to requests by `id` so calls may run concurrently."""

    def __init__(self, ws: ClientConnection, server: str) -> None:
        self.ws, self.server, self.timeout = ws, server, 10.0
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            response = msgpack.unpackb(message, raw=False)
            future = self._waiting.pop(response.get("id"), None)
            if future is not None and not future.done():
                future.set_result(response)

    async def call_raw(self, message: dict[str, Any], timeout: float | None = None,
                       ) -> dict[str, Any]:
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        await self.ws.send(msgpack.packb({**message, "id": request_id}, use_bin_type=True))
        return await asyncio.wait_for(future, timeout or self.timeout)

    async def call(self, op: str, timeout: float | None = None, **fields: Any,
                   ) -> dict[str, Any]:
        response = await self.call_raw({"op": op, **fields}, timeout)
        if not response.get("ok"):
            error = response["error"]
            raise ClientError(error["code"], error["message"])
        return response


@asynccontextmanager
async def ws_client(srv: RunningServer, profiles: Path, token: str | None = None,
                    ) -> AsyncIterator[QpqClient]:
    async with ws_connect(ws_url(srv), proxy=None, compression=None) as ws:
        conn = WsConnection(ws, "ws-" + srv.address)
        await conn.call("hello", token=token or srv.auth_token)
        yield QpqClient(conn, profiles)  # type: ignore[arg-type]


@asynccontextmanager
async def quic_client(srv: RunningServer, profiles: Path) -> AsyncIterator[QpqClient]:
    async with srv.connect() as conn:
        yield QpqClient(conn, profiles)


async def test_quic_and_websocket_clients_exchange_messages_both_ways(
        ws_server: RunningServer, tmp_path: Path) -> None:
    async with quic_client(ws_server, tmp_path / "q") as q, \
            ws_client(ws_server, tmp_path / "w") as w:
        await q.register("quic_alice", "pw-a")
        await w.register("ws_bob", "pw-b")
        await q.send_text("quic_alice", ["ws_bob"], "hello over QUIC")
        assert [(m.sender, m.text) for m in await w.receive("ws_bob")] == [
            ("quic_alice", "hello over QUIC")]
        await w.send_text("ws_bob", ["quic_alice"], "hello from a browser")
        assert [(m.sender, m.text) for m in await q.receive("quic_alice")] == [
            ("ws_bob", "hello from a browser")]
        # long-poll over WebSocket wakes on a QUIC enqueue; other calls on the same
        # socket are answered meanwhile (responses matched by id)
        waiter = asyncio.create_task(w.receive("ws_bob", wait_s=10))
        await await_until(lambda: ws_server.metric("qpq_delivery_waiters") >= 1, 10,
                          "the WebSocket fetch parking as a long-poll waiter")
        assert (await w.conn.call("ping"))["ok"] is True
        assert not waiter.done()
        await q.send_text("quic_alice", ["ws_bob"], "wake up")
        assert [m.text for m in await asyncio.wait_for(waiter, 10)] == ["wake up"]


async def test_websocket_needs_the_access_token_and_a_session(
        ws_server: RunningServer, tmp_path: Path) -> None:
    async with ws_connect(ws_url(ws_server), proxy=None) as ws:
        conn = WsConnection(ws, "x")
        assert (await conn.call_raw({"op": "ping"}))["error"]["code"] == "unauthenticated"
        bad = await conn.call_raw({"op": "hello", "token": "wrong"})
        assert bad["error"]["code"] == "unauthenticated"
        await conn.call("hello", token=ws_server.auth_token)
        assert (await conn.call_raw({"op": "fetch", "session": "forged.token"}))[
            "error"]["code"] == "invalid_session"
        put = await conn.call_raw({"op": "blob_put", "session": "x", "size": 1,
                                   "sha256": b"\x00" * 32})
        assert put["error"]["code"] == "bad_request" and "QUIC" in put["error"]["message"]
        assert (await conn.call("ping"))["ok"] is True  # the socket lives on


@pytest.mark.parametrize(("message", "close_code"), [
    ("a text message", 1003),
    (b"\xc1\xc1 not msgpack", 1007),
    (msgpack.packb(["op", "ping"]), 1007),
    (msgpack.packb({1: "int key"}), 1007),
    (b"\x00" * 1_100_000, 1009),
])
async def test_bad_messages_get_an_error_code_then_a_clean_close(
        ws_server: RunningServer, message: str | bytes, close_code: int) -> None:
    async with ws_connect(ws_url(ws_server), proxy=None, max_size=None) as ws:
        await ws.send(message)
        response = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10), raw=False)
        expected = "too_large" if close_code == 1009 else "bad_frame"
        assert response["ok"] is False and response["error"]["code"] == expected
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == close_code
    async with ws_connect(ws_url(ws_server), proxy=None) as ws:  # server still serves
        conn = WsConnection(ws, "x")
        assert (await conn.call("hello", token=ws_server.auth_token))["ok"] is True


async def test_websocket_requests_share_the_rate_limiter(ws_server: RunningServer) -> None:
    async with ws_connect(ws_url(ws_server), proxy=None) as ws:
        conn = WsConnection(ws, "x")
        await conn.call("hello", token=ws_server.auth_token)
        answers = await asyncio.gather(*(conn.call_raw({"op": "ping"}) for _ in range(400)))
        codes = {a["error"]["code"] for a in answers if not a["ok"]}
        assert codes == {"rate_limited"}

    assert ws_server.metric("qpq_rate_limit_hit_total", scope="address") >= 1
