"""LISTEN/NOTIFY delivery wake-ups between processes sharing one PostgreSQL (two
notifiers here stand for two nodes: each has its own connections)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from qpq_server.pgnotify import PgNotifier, channel_for, payloads
from qpq_server.secrets import Secret
from tests.helpers.postgres import PostgresCluster, pg_cluster

__all__ = ["pg_cluster"]


async def _started(dsn: str, domain: str = "example.org") -> PgNotifier:
    notifier = PgNotifier(Secret(dsn), channel_for(domain))
    await notifier.start()
    async with asyncio.timeout(10):
        await notifier.listening.wait()
    return notifier


@pytest.fixture
async def nodes(pg_cluster: PostgresCluster) -> AsyncIterator[tuple[PgNotifier, PgNotifier]]:
    dsn = pg_cluster.new_database()
    a, b = await _started(dsn), await _started(dsn)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_notify_on_one_node_wakes_a_waiter_on_the_other(
        nodes: tuple[PgNotifier, PgNotifier]) -> None:
    a, b = nodes
    started = time.monotonic()
    waiter = asyncio.create_task(b.wait("bob", 10))
    await asyncio.sleep(0)  # parked
    a.notify(["bob"])
    assert await asyncio.wait_for(waiter, 10) is True
    assert time.monotonic() - started < 2


async def test_local_waiters_wake_at_once_and_others_stay_parked(
        nodes: tuple[PgNotifier, PgNotifier]) -> None:
    a, b = nodes
    local = asyncio.create_task(a.wait("carol", 10))
    other = asyncio.create_task(b.wait("dave", 1.0))
    await asyncio.sleep(0)
    a.notify(["carol"])
    assert await asyncio.wait_for(local, 5) is True
    assert await other is False  # nobody notified dave: it times out


async def test_clusters_on_one_database_do_not_wake_each_other(
        pg_cluster: PostgresCluster) -> None:
    dsn = pg_cluster.new_database()
    a, b = await _started(dsn, "one.example"), await _started(dsn, "two.example")
    try:
        waiter = asyncio.create_task(b.wait("erin", 1.0))
        await asyncio.sleep(0)
        a.notify(["erin"])
        assert await waiter is False
    finally:
        await a.close()
        await b.close()


def test_channel_names_are_valid_identifiers() -> None:
    name = channel_for("chat.example.org")
    assert name == channel_for("chat.example.org") != channel_for("other.example.org")
    assert name.isidentifier() and len(name) < 63


async def test_a_burst_of_notifies_wakes_every_remote_waiter(
        nodes: tuple[PgNotifier, PgNotifier]) -> None:
    a, b = nodes
    names = [f"user{i}" for i in range(300)]
    waiters = [asyncio.create_task(b.wait(name, 10)) for name in names]
    await asyncio.sleep(0)
    assert b.waiting == 300
    a.notify(names)
    a.notify(names[:10])  # repeats in a burst are sent once
    assert all(await asyncio.wait_for(asyncio.gather(*waiters), 10))


async def test_a_burst_longer_than_one_notification_wakes_every_remote_waiter(
        nodes: tuple[PgNotifier, PgNotifier]) -> None:
    # 300 names of 64 characters: ~19 KB, more than PostgreSQL takes in one payload
    a, b = nodes
    names = [f"{i:03d}".ljust(64, "x") for i in range(300)]
    waiters = [asyncio.create_task(b.wait(name, 10)) for name in names]
    await asyncio.sleep(0)
    a.notify(names)
    assert all(await asyncio.wait_for(asyncio.gather(*waiters), 10))


def test_payloads_join_names_under_the_notify_limit() -> None:
    names = [f"{i:03d}".ljust(64, "x") for i in range(300)] + ["alice#0a1b"]
    out = payloads(names)
    assert len(out) == 3 and all(len(p.encode()) < 8000 for p in out)
    assert [n for p in out for n in p.split(" ")] == names
    assert payloads(["bob"]) == ["bob"] and payloads([]) == []


async def test_notifications_are_sent_without_waiting_for_a_wal_flush(
        pg_cluster: PostgresCluster) -> None:
    # the wake-up is a hint after a durable commit: its own commit needs no flush
    notifier = PgNotifier(Secret(pg_cluster.new_database()), channel_for("example.org"))
    async with await notifier._connect_sender() as conn:
        row = await (await conn.execute("SHOW synchronous_commit")).fetchone()
    assert row == ("off",)
