"""Relaying between two real federated servers: delivery as from USER@DOMAIN, exactly
once and in order, queued while the peer is away, kept across restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qpq_server.devserver import await_until
from tests.federation.conftest import Site, make_sites


async def test_a_message_to_user_at_peer_is_relayed_and_arrives_from_user_at_origin(
        sites: tuple[Site, Site], tmp_path: Path) -> None:
    a, b = sites
    async with b.client(tmp_path) as cb:
        await cb.register("bob", "pw-bob")
    async with a.client(tmp_path) as ca:
        await ca.register("alice", "pw-alice")
        session = ca.profile("alice").session
        answer = await ca.conn.call("enqueue", session=session, recipients=["bob@b.example"],
                                    payload=b"opaque ciphertext")
        assert len(answer["ids"]) == 1
    async with b.client(tmp_path) as cb:
        async def arrived() -> list[dict[str, object]]:
            got = await cb.conn.call("fetch", session=cb.profile("bob").session, wait_s=1.0)
            return list(got["messages"])

        messages = await await_until(arrived, 20, "the relayed message at b.example")
        assert [(m["from"], m["payload"]) for m in messages] == [
            ("alice@a.example", b"opaque ciphertext")]
    await await_until(lambda: a.running.metric("qpq_federation_relay_total",
                                               peer="b.example", result="sent") == 1,
                      10, "a counting the relay as sent")
    assert b.running.metric("qpq_federation_relay_total", peer="a.example",
                            result="received") == 1
    assert a.running.metric("qpq_federation_peer_up", peer="b.example") == 1
    assert a.running.metric("qpq_federation_queue_depth", peer="b.example") == 0


async def register(site: Site, profiles: Path, user: str) -> str:
    async with site.client(profiles) as c:
        await c.register(user, "pw-" + user)
        session = c.profile(user).session
        assert session is not None
        return session


async def send_raw(site: Site, session: str, to: str, payloads: list[bytes]) -> None:
    async with site.running.connect() as conn:
        for payload in payloads:
            await conn.call("enqueue", session=session, recipients=[to], payload=payload)


async def inbox(site: Site, session: str, expect: int, timeout: float = 30) -> list[
        tuple[str, bytes]]:
    """Fetch (and ack) until `expect` messages arrived; then check nothing more comes."""
    got: list[tuple[str, bytes]] = []
    async with site.running.connect() as conn:
        async def more() -> bool:
            page = await conn.call("fetch", session=session, wait_s=0.5)
            got.extend((m["from"], m["payload"]) for m in page["messages"])
            if page["messages"]:
                await conn.call("ack", session=session, ids=[m["id"] for m in page["messages"]])
            return len(got) >= expect

        await await_until(more, timeout, f"{expect} relayed messages")
        await asyncio.sleep(1.0)  # a duplicate would arrive within the retry interval
        page = await conn.call("fetch", session=session, wait_s=0.5)
        got.extend((m["from"], m["payload"]) for m in page["messages"])
    return got


async def test_peer_down_queues_then_delivers_all_once_in_order(
        sites: tuple[Site, Site], tmp_path: Path) -> None:
    a, b = sites
    bob = await register(b, tmp_path, "bob")
    alice = await register(a, tmp_path, "alice")
    b.stop()
    payloads = [f"m{i}".encode() for i in range(6)]
    await send_raw(a, alice, "bob@b.example", payloads)
    await await_until(lambda: a.running.metric("qpq_federation_queue_depth",
                                               peer="b.example") == 6
                      and a.running.metric("qpq_federation_peer_up", peer="b.example") == 0
                      and a.running.metric("qpq_federation_relay_total", peer="b.example",
                                           result="retry") > 0,
                      20, "six relays queued, tried, and the peer marked down")
    b.start()
    got = await inbox(b, bob, 6)
    assert got == [("alice@a.example", p) for p in payloads]
    await await_until(lambda: a.running.metric("qpq_federation_queue_depth",
                                               peer="b.example") == 0
                      and a.running.metric("qpq_federation_peer_up", peer="b.example") == 1,
                      20, "the queue drained and the peer marked up")
    assert a.running.metric("qpq_federation_relay_total", peer="b.example",
                            result="sent") == 6


@pytest.mark.parametrize("backend", ["sqlcipher", "file", "postgres"])
async def test_a_restart_of_the_sender_while_relays_wait_loses_none(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    dsns = None
    if backend == "postgres":
        cluster = request.getfixturevalue("pg_cluster")
        dsns = (cluster.new_database(), cluster.new_database())
    a, b = make_sites(tmp_path, {"storage": {"backend": backend}}, dsns)
    try:
        b.start()
        a.start()
        bob = await register(b, tmp_path, "bob")
        alice = await register(a, tmp_path, "alice")
        b.stop()
        payloads = [f"r{i}".encode() for i in range(4)]
        await send_raw(a, alice, "bob@b.example", payloads)
        a.stop()
        a.start()
        await await_until(lambda: a.running.metric("qpq_federation_queue_depth",
                                                   peer="b.example") == 4,
                          20, "the queue read back after the restart")
        b.start()
        assert await inbox(b, bob, 4) == [("alice@a.example", p) for p in payloads]
    finally:
        a.stop()
        b.stop()


async def test_relays_older_than_the_max_age_expire_counted(tmp_path: Path) -> None:
    a, b = make_sites(tmp_path, relay_max_age_s=1.0, remember_relays_s=10.0)
    try:
        b.start()
        a.start()
        await register(b, tmp_path, "bob")
        alice = await register(a, tmp_path, "alice")
        b.stop()
        await send_raw(a, alice, "bob@b.example", [b"too late"])
        await await_until(lambda: a.running.metric("qpq_federation_relay_total",
                                                   peer="b.example", result="expired") == 1,
                          20, "the relay expiring")
        assert a.running.metric("qpq_federation_queue_depth", peer="b.example") == 0
        assert "federation relays expired" in a.running.log()
    finally:
        a.stop()
        b.stop()


async def test_peer_up_follows_a_quiet_peer_through_probes(sites: tuple[Site, Site]) -> None:
    a, b = sites
    await await_until(lambda: a.running.metric("qpq_federation_peer_up",
                                               peer="b.example") == 1,
                      20, "a quiet but reachable peer read as up")
    b.stop()
    await await_until(lambda: a.running.metric("qpq_federation_peer_up",
                                               peer="b.example") == 0,
                      20, "a vanished peer read as down without any relay")
    assert a.running.metric("qpq_federation_queue_depth", peer="b.example") == 0


async def test_with_two_workers_every_worker_queues_and_one_relays(tmp_path: Path) -> None:
    a, b = make_sites(tmp_path, {"server": {"workers": 2}})
    try:
        b.start()
        a.start()
        bob = await register(b, tmp_path, "bob")
        alice = await register(a, tmp_path, "alice")
        payloads = [f"w{i}".encode() for i in range(8)]
        for payload in payloads:  # new connections: the kernel spreads them over workers
            await send_raw(a, alice, "bob@b.example", [payload])
        assert await inbox(b, bob, 8) == [("alice@a.example", p) for p in payloads]
        # b.example (two workers too) takes relays and answers key lookups on either
        carol = await register(b, tmp_path, "carol")
        await send_raw(b, carol, "alice@a.example", [b"from carol"])
        assert await inbox(a, alice, 1) == [("carol@b.example", b"from carol")]
    finally:
        a.stop()
        b.stop()
