"""Attacks on the transport, each against a real server on loopback (issue 11).

Before the access token a connection may hold little: a few KiB of request bytes, a few
seconds, and a slot in a small per-address and global budget of its own. Malformed
requests get a stable error code, never a traceback in the log.
"""

from __future__ import annotations

import asyncio
import signal
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from qpq_server.client import ClientError
from qpq_server.client.connection import QpqConnection
from qpq_server.devserver import RunningServer, await_until, running_server
from qpq_server.secrets import write_env_file


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    overrides = {"rate_limit": {"enabled": False},
                 "quic": {"hello_timeout_s": 1.5, "max_unauthenticated_per_address": 4,
                          "max_preauth_bytes": 16384}}
    with running_server(tmp_path_factory.mktemp("abuse"), overrides=overrides) as server:
        yield server


@asynccontextmanager
async def tokenless(server: RunningServer) -> AsyncIterator[QpqConnection]:
    async with server.connect("", hello=False) as conn:
        yield conn


@pytest.mark.parametrize("op", [[], {}, [1, 2], {"a": 1}])
async def test_op_of_an_unhashable_type_gets_bad_request_and_no_traceback(
        srv: RunningServer, op: Any) -> None:
    async with srv.connect() as conn:
        response = await conn.call_raw({"op": op})
        assert response["ok"] is False and response["error"]["code"] == "bad_request"
        assert (await conn.call("ping"))["ok"]
    assert "Traceback" not in srv.log()
    assert "TypeError" not in srv.log()


async def test_an_empty_stream_gets_bad_frame(srv: RunningServer) -> None:
    async with srv.connect() as conn:
        response = await asyncio.wait_for(conn.protocol.send_raw(b"", end_stream=True), 10)
        assert response["error"]["code"] == "bad_frame"
        assert (await conn.call("ping"))["ok"]


async def test_a_tokenless_connection_is_closed_after_hello_timeout(
        srv: RunningServer) -> None:
    before = srv.metric("qpq_connections_refused_total", reason="hello_timeout")
    async with tokenless(srv) as conn:
        await await_until(lambda: conn.protocol.terminated is not None, 15,
                     "the server to close the tokenless connection")
        assert "access token" in (conn.protocol.terminated or "")
    assert srv.metric("qpq_connections_refused_total", reason="hello_timeout") == before + 1


async def test_tokenless_bytes_are_capped_and_the_connection_closed(
        srv: RunningServer) -> None:
    before = srv.metric("qpq_connections_refused_total", reason="preauth_bytes")
    async with tokenless(srv) as conn:
        # Partial frames that declare 1 MiB each: before the fix the server buffered
        # them all (three such connections held ~100 MiB).
        for _ in range(8):
            conn.protocol.send_raw(struct.pack(">I", 1_000_000) + b"x" * 4000,
                                   end_stream=False)
        await await_until(lambda: conn.protocol.terminated is not None, 10,
                     "the server to close the connection over its pre-auth budget")
    assert srv.metric("qpq_connections_refused_total", reason="preauth_bytes") == before + 1


async def test_tokenless_connections_cannot_fill_the_server(srv: RunningServer) -> None:
    """One address holds at most 4 tokenless connections here; a client from another
    address still gets in."""
    refused = 0
    async with AsyncExitStack() as stack:
        for _ in range(6):
            try:
                conn = await stack.enter_async_context(tokenless(srv))
                await asyncio.wait_for(conn.call_raw({"op": "ping"}), 5)
            except (ClientError, TimeoutError):
                refused += 1
        assert refused == 2
        async with srv.connect(local_host="127.0.0.2") as good:
            assert (await good.call("ping"))["ok"]
    # Once authenticated, a connection leaves the pre-auth budget: five of them at once.
    async with AsyncExitStack() as stack:
        for _ in range(5):
            conn = await stack.enter_async_context(srv.connect(local_host="127.0.0.3"))
            assert (await conn.call("ping"))["ok"]
    assert srv.metric("qpq_connections_refused_total", reason="unauthenticated_address") >= 2


def test_revoking_the_access_token_closes_its_connections(tmp_path: Path) -> None:
    async def scenario(server: RunningServer) -> None:
        async with server.connect() as old:
            assert (await old.call("ping"))["ok"]
            write_env_file(server.data_dir / ".env",
                           {"QPQ_AUTH_TOKEN": "a-brand-new-token-0123456789abcdef",
                            "QPQ_DB_KEY": server.db_key})
            server.signal(signal.SIGHUP)
            await await_until(lambda: old.protocol.terminated is not None, 15,
                         "the connection on the revoked token to be closed")
        async with server.connect("a-brand-new-token-0123456789abcdef") as new:
            assert (await new.call("ping"))["ok"]
        with pytest.raises(ClientError):
            async with server.connect():
                pass

    with running_server(tmp_path) as server:
        asyncio.run(scenario(server))
