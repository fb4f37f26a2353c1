"""`fetch` carrying the previous page's acks (`ack: [int]`): one request fewer per
delivered page. In process (a real Service on a real SQLCipher file) for the semantics
and every hostile input, then over QUIC against a real server, and the client
(`QpqClient.receive(defer_ack=True)`) and `qpq-client recv` itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from qpq_server.client import ClientError, QpqClient
from qpq_server.devices import device_id
from qpq_server.devserver import RunningServer, running_server
from qpq_server.protocol.dispatch import ConnectionState
from tests.helpers.dispatch import Harness, code
from tests.helpers.dispatch import harness as _harness
from tests.server.conftest import ClientFactory, raw_connection
from tests.server.test_client_delivery import cli, ok, register, rows
from tests.server.test_devices_dispatch import two_devices


@pytest.fixture(scope="module")
def paging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server whose fetch pages hold at most 128 KiB of payload."""
    with running_server(tmp_path_factory.mktemp("paging"), overrides={
            "rate_limit": {"enabled": False}, "quic": {"max_frame_bytes": 65536},
            "limits": {"max_response_bytes": 131072}}) as server:
        yield server


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async for harness in _harness(tmp_path, rate_limit={"enabled": False},
                                  limits={"max_devices": 3}):
        yield harness


async def queued(h: Harness, conn: ConnectionState, session: str, **fields: Any) -> list[int]:
    page = await h.call(conn, "fetch", session=session, **fields)
    assert page["ok"], page
    return [m["id"] for m in page["messages"]]


async def send(h: Harness, conn: ConnectionState, session: str, to: str, n: int) -> list[int]:
    ids: list[int] = []
    for i in range(n):
        sent = await h.call(conn, "enqueue", session=session, recipients=[to],
                            payload=b"ct%d" % i)
        assert sent["ok"], sent
        ids += sent["ids"]
    return ids


# -- semantics ----------------------------------------------------------------------------

async def test_a_fetch_acks_what_it_carries_before_it_reads(h: Harness) -> None:
    conn = await h.connect()
    alice = await h.session(conn, "alice")
    bob = await h.session(conn, "bob")
    ids = await send(h, conn, alice, "bob", 3)
    first = await h.call(conn, "fetch", session=bob, limit=2)
    assert [m["id"] for m in first["messages"]] == ids[:2] and first["more"]
    assert first["acked"] == 0  # nothing carried
    depth = h.metrics.registry.get_sample_value("qpq_delivery_queue_depth")
    second = await h.call(conn, "fetch", session=bob, limit=2, ack=ids[:2])
    # the page starts after what it acked: those are gone, not fetched again
    assert second["acked"] == 2 and [m["id"] for m in second["messages"]] == ids[2:]
    assert not second["more"]
    assert h.metrics.registry.get_sample_value("qpq_delivery_queue_depth") == depth - 2
    last = await h.call(conn, "fetch", session=bob, ack=ids[2:])
    assert last["acked"] == 1 and last["messages"] == []
    again = await h.call(conn, "fetch", session=bob, ack=ids)  # acking twice is harmless
    assert again["ok"] and again["acked"] == 0
    assert await queued(h, conn, bob, ack=[]) == []  # an empty list is no ack
    assert await queued(h, conn, bob, ack=None) == []  # nil is absent


async def test_a_long_poll_fetch_acks_then_parks(h: Harness) -> None:
    conn = await h.connect()
    alice = await h.session(conn, "alice")
    bob = await h.session(conn, "bob")
    (old,) = await send(h, conn, alice, "bob", 1)
    assert await queued(h, conn, bob) == [old]
    parked = asyncio.ensure_future(h.call(conn, "fetch", session=bob, wait_s=10.0, ack=[old]))
    for _ in range(500):  # until it is parked: the ack went through before the wait
        if h.core.service.notifier.waiting:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    assert not parked.done()
    (new,) = await send(h, conn, alice, "bob", 1)
    answer = await asyncio.wait_for(parked, 5)
    assert answer["acked"] == 1 and [m["id"] for m in answer["messages"]] == [new]


# -- abuse: a session acks its own queue only -----------------------------------------------

async def test_a_fetch_cannot_ack_another_users_messages(h: Harness) -> None:
    conn = await h.connect()
    alice = await h.session(conn, "alice")
    mallory = await h.session(conn, "mallory")
    await h.session(conn, "carol")
    carols = await send(h, conn, alice, "carol", 2)
    own = await send(h, conn, alice, "mallory", 1)
    answer = await h.call(conn, "fetch", session=mallory, ack=carols + own)
    assert answer["acked"] == 1  # only mallory's own message
    assert [m["id"] for m in answer["messages"]] == []
    carol = str((await h.login(conn, "carol"))["session"])
    assert await queued(h, conn, carol) == carols  # carol's copies are untouched


async def test_a_fetch_cannot_ack_another_devices_copy(h: Harness) -> None:
    conn, bob, first, second = await two_devices(h, "fa_bob")
    alice = await h.session(conn, "fa_alice")
    sent = await h.call(conn, "enqueue", session=alice, recipients=["fa_bob"], payload=b"ct")
    assert len(sent["ids"]) == 2  # one copy per device
    answer = await h.call(conn, "fetch", session=bob, device=device_id(first), ack=sent["ids"])
    assert answer["acked"] == 1 and answer["messages"] == []  # its own copy alone
    assert len(await queued(h, conn, bob, device=device_id(second))) == 1


# -- abuse: hostile `ack` fields are refused whole, before anything is deleted ---------------

@pytest.mark.parametrize(("ack", "expected"), [
    ("1,2", "bad_request"),
    (7, "bad_request"),
    ({"1": 1}, "bad_request"),
    ([1.5], "bad_request"),
    ([-1], "bad_request"),
    ([True], "bad_request"),
    ([b"\x01"], "bad_request"),
    (["1"], "bad_request"),
    ([None], "bad_request"),
    (list(range(501)), "too_large"),  # ack's own cap: limits.max_fetch_batch
])
async def test_a_hostile_ack_list_is_refused_and_deletes_nothing(
        h: Harness, ack: Any, expected: str) -> None:
    conn = await h.connect()
    alice = await h.session(conn, "alice")
    bob = await h.session(conn, "bob")
    ids = await send(h, conn, alice, "bob", 2)
    bad = ack if expected == "too_large" else (
        [ids[0], *ack] if isinstance(ack, list) else ack)
    answer = await h.call(conn, "fetch", session=bob, ack=bad)
    assert code(answer) == expected, answer
    assert h.errors("fetch", expected) == 1
    assert await queued(h, conn, bob) == ids  # nothing was deleted


async def test_an_ack_is_not_applied_when_another_field_is_bad(h: Harness) -> None:
    conn = await h.connect()
    alice = await h.session(conn, "alice")
    bob = await h.session(conn, "bob")
    ids = await send(h, conn, alice, "bob", 1)
    assert code(await h.call(conn, "fetch", session=bob, ack=ids, limit=0)) == "bad_request"
    assert code(await h.call(conn, "fetch", session=bob, ack=ids, wait_s="x")) == "bad_request"
    assert code(await h.call(conn, "fetch", session=bob + "x", ack=ids)) == "invalid_session"
    assert await queued(h, conn, bob) == ids


async def test_the_cap_is_acks_own(h: Harness) -> None:
    conn = await h.connect()
    bob = await h.session(conn, "bob")
    cap = h.core.service.config.limits.max_fetch_batch
    assert (await h.call(conn, "fetch", session=bob, ack=list(range(cap))))["ok"]
    assert code(await h.call(conn, "ack", session=bob, ids=list(range(cap + 1)))) == "too_large"
    assert code(await h.call(conn, "fetch", session=bob, ack=list(range(cap + 1)))) == "too_large"


# -- over QUIC, and the client --------------------------------------------------------------

async def test_fetch_with_acks_over_quic(server: RunningServer, client: ClientFactory) -> None:
    async with client() as c:
        await c.register("fq_a", "pw")
        await c.register("fq_b", "pw")
        for i in range(3):
            await c.send_text("fq_a", ["fq_b"], f"m{i}")
        bob = c.profile("fq_b").state().session
        device = device_id(c.profile("fq_b").identity_public)
        async with raw_connection(server) as conn:
            first = await conn.call("fetch", session=bob, device=device, limit=2)
            ids = [m["id"] for m in first["messages"]]
            second = await conn.call("fetch", session=bob, device=device, ack=ids)
            assert second["acked"] == 2 and len(second["messages"]) == 1
            assert second["messages"][0]["id"] not in ids
            with pytest.raises(ClientError) as refused:
                await conn.call("fetch", session=bob, device=device, ack=list(range(501)))
            assert refused.value.code == "too_large"
            with pytest.raises(ClientError) as wrong:
                await conn.call("fetch", session=bob, device=device, ack=[b"x"])
            assert wrong.value.code == "bad_request"
            assert (await conn.call("ping"))["ok"]  # the connection lives on
            last = await conn.call("fetch", session=bob, device=device,
                                   ack=[m["id"] for m in second["messages"]])
            assert last["acked"] == 1 and last["messages"] == []


async def five_texts(c: QpqClient, sender: str, recipient: str) -> None:
    """Register both, then queue "m0".."m4" from sender to recipient."""
    await c.register(sender, "pw")
    await c.register(recipient, "pw")
    for i in range(5):
        await c.send_text(sender, [recipient], f"m{i}")


async def test_a_deferred_receive_acks_on_the_next_fetch_and_on_flush(
        server: RunningServer, client: ClientFactory) -> None:
    async with client() as c:
        await five_texts(c, "fd_a", "fd_b")
        acks_before = server.metric("qpq_rpc_duration_seconds_count", op="ack")
        got = await c.receive("fd_b", limit=2, defer_ack=True)
        assert [m.text for m in got] == ["m0", "m1"]
        got += await c.receive("fd_b", limit=2, defer_ack=True)  # carries m0, m1's ack
        got += await c.receive("fd_b", limit=2, defer_ack=True)
        assert [m.text for m in got] == [f"m{i}" for i in range(5)]
        # nothing was acked on its own so far: each ack rode on the following fetch
        assert server.metric("qpq_rpc_duration_seconds_count", op="ack") == acks_before
        await c.flush_acks("fd_b")  # the last page's ack goes alone
        assert server.metric("qpq_rpc_duration_seconds_count", op="ack") == acks_before + 1
        await c.flush_acks("fd_b")  # nothing left: no request
        assert server.metric("qpq_rpc_duration_seconds_count", op="ack") == acks_before + 1
        assert await c.receive("fd_b") == []


def test_recv_carries_each_pages_ack_on_the_next_fetch(paging: RunningServer,
                                                        tmp_path: Path) -> None:
    """`qpq-client recv` over a mailbox the server pages by bytes: every page's ack rides
    on the next fetch, at most one `ack` request at the end, nothing lost or shown twice."""
    prof = tmp_path / "p"
    register(paging, prof, "pr_a", "pr_b")
    for i in range(5):  # ~40 KB each: a page (RESPONSE bytes) holds two or three
        ok(cli(paging, prof, "send", "pr_a", "pr_b", stdin=f"{i}" + "x" * 40_000))
    acks = paging.metric("qpq_rpc_duration_seconds_count", op="ack")
    fetches = paging.metric("qpq_fetch_total")
    shown = rows(ok(cli(paging, prof, "recv", "pr_b", "--json")))
    assert [str(r["text"])[0] for r in shown] == ["0", "1", "2", "3", "4"]
    assert paging.metric("qpq_fetch_total") - fetches >= 3  # paged
    # At most one `ack` request: the last page's, unless a final (empty) fetch carried it.
    assert paging.metric("qpq_rpc_duration_seconds_count", op="ack") - acks <= 1
    assert rows(ok(cli(paging, prof, "recv", "pr_b", "--json"))) == []  # all were acked


class ServerBeforeFetchAcks:
    """A connection as a server from before `fetch` took acks answers it: such a server
    ignores the request field it does not know (`ack`) and answers without `acked`."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.fetch_acks_dropped = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def call(self, op: str, **fields: Any) -> Any:
        if op == "fetch" and fields.pop("ack", None) is not None:
            self.fetch_acks_dropped += 1
        result = await self._conn.call(op, **fields)
        if op == "fetch":
            result.pop("acked", None)
        return result


async def test_a_deferred_receive_against_an_older_server_acks_on_its_own(
        server: RunningServer, client: ClientFactory) -> None:
    async with client() as c:
        await five_texts(c, "fo_a", "fo_b")
        old = ServerBeforeFetchAcks(c.conn)
        c.conn = old
        acks_before = server.metric("qpq_rpc_duration_seconds_count", op="ack")
        got = []
        for _ in range(3):
            got += await c.receive("fo_b", limit=2, defer_ack=True)
        # Each message once, in order, a full page each time: the first fetch that
        # carried an ack read its page again (the server ignored the ack); the client
        # acked alone, read again, and from then on acks before it fetches.
        assert [m.text for m in got] == [f"m{i}" for i in range(5)]
        assert old.fetch_acks_dropped == 1
        assert server.metric("qpq_rpc_duration_seconds_count", op="ack") == acks_before + 2
        await c.flush_acks("fo_b")
        assert server.metric("qpq_rpc_duration_seconds_count", op="ack") == acks_before + 3
        assert await c.receive("fo_b") == []  # everything was acked
