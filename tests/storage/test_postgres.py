"""What only the shared PostgreSQL backend promises: several nodes on one database stay
consistent, migrations are versioned and run once, and failures say what is wrong
without the DSN's password."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import psycopg
import pytest

from qpq_server.errors import StorageError, StorageUnavailable
from qpq_server.secrets import Secret
from qpq_server.storage import postgres as pg_module
from qpq_server.storage.pg_migrations import PG_SCHEMA_VERSION
from qpq_server.storage.postgres import PostgresStorage, describe_pg_error
from tests.helpers.ports import free_port
from tests.helpers.postgres import PostgresCluster, postgres_cluster


@pytest.fixture
async def two_nodes(pg_cluster: PostgresCluster) -> AsyncIterator[tuple[PostgresStorage, ...]]:
    dsn = Secret(pg_cluster.new_database())
    nodes = (PostgresStorage(dsn, pool_size=4), PostgresStorage(dsn, pool_size=4))
    await asyncio.gather(*(n.open() for n in nodes))  # concurrent migrations: applied once
    try:
        yield nodes
    finally:
        for n in nodes:
            await n.close()


async def test_schema_is_versioned_and_migrated_once(pg_cluster: PostgresCluster) -> None:
    dsn = pg_cluster.new_database()
    nodes = [PostgresStorage(Secret(dsn)) for _ in range(3)]
    await asyncio.gather(*(n.open() for n in nodes))  # nodes starting together
    for n in nodes:
        await n.close()
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [r[0] for r in rows] == list(range(1, PG_SCHEMA_VERSION + 1))
    again = PostgresStorage(Secret(dsn))
    await again.open()  # reopening applies nothing
    await again.close()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone() == (
            PG_SCHEMA_VERSION,)


async def test_a_newer_schema_is_refused(pg_cluster: PostgresCluster) -> None:
    dsn = pg_cluster.new_database()
    s = PostgresStorage(Secret(dsn))
    await s.open()
    await s.close()
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO schema_version(version) VALUES (999)")
    with pytest.raises(StorageError, match="schema version 999 is newer"):
        await PostgresStorage(Secret(dsn)).open()


async def test_key_packages_taken_once_across_nodes(
        two_nodes: tuple[PostgresStorage, ...]) -> None:
    a, b = two_nodes
    await a.create_account("hot", b"pf", 1, 1.0)
    await a.add_key_packages("hot", [bytes([i]) * 8 for i in range(30)])
    takes = [n.take_key_package("hot") for n in (a, b) for _ in range(25)]
    results = await asyncio.gather(*takes)
    packages = [r.key_package for r in results if r is not None]
    assert len(packages) == 30 and len(set(packages)) == 30
    assert await b.count_key_packages("hot") == 0


async def test_kt_appends_from_two_nodes_stay_consecutive(
        two_nodes: tuple[PostgresStorage, ...]) -> None:
    a, b = two_nodes
    names = [f"u{i}" for i in range(20)]
    for name in names:
        await a.create_account(name, b"pf", 1, 1.0)
    indexes = await asyncio.gather(*(
        (a if i % 2 else b).publish_identity_key(name, b"K" * 32, name.encode(), 2.0)
        for i, name in enumerate(names)))
    assert sorted(indexes) == list(range(20))
    leaves = await b.kt_leaves()
    assert [x.index for x in leaves] == list(range(20))
    assert {x.username: x.index for x in leaves} == dict(zip(names, indexes, strict=True))


async def test_a_failed_publication_appends_no_leaf(
        two_nodes: tuple[PostgresStorage, ...]) -> None:
    a, _ = two_nodes
    with pytest.raises(StorageError, match="no account 'ghost'"):
        await a.publish_identity_key("ghost", b"K" * 32, b"leaf", 1.0)
    assert await a.kt_leaves() == []


async def test_messages_enqueued_on_one_node_are_fetched_on_the_other(
        two_nodes: tuple[PostgresStorage, ...]) -> None:
    a, b = two_nodes
    await a.create_account("r", b"pf", 1, 1.0)
    ids = await a.enqueue("s", ["r"], b"cross", 1.0)
    got = await b.fetch("r", 10)
    assert [(m.id, m.payload) for m in got] == [(ids[0], b"cross")]
    assert await b.ack("r", ids) == 1 and await a.fetch("r", 10) == []


async def test_commit_observer_sees_each_write(pg_cluster: PostgresCluster) -> None:
    seen: list[float] = []
    s = PostgresStorage(Secret(pg_cluster.new_database()), on_commit=seen.append)
    await s.open()
    try:
        seen.clear()  # migrations are not client writes
        await s.create_account("a", b"pf", 1, 1.0)
        await s.enqueue("a", ["a"], b"x", 1.0)
        await s.fetch("a", 1)  # a read: not observed
        assert len(seen) == 2 and all(0 <= d < 10 for d in seen)
    finally:
        await s.close()


async def test_unreachable_database_is_one_clear_line_without_the_password() -> None:
    dsn = f"postgresql://qpq:hunter2-secret@127.0.0.1:{free_port()}/qpq"
    s = PostgresStorage(Secret(dsn), connect_timeout_s=1)
    with pytest.raises(StorageError) as caught:
        await s.open()
    message = str(caught.value)
    assert "\n" not in message and "hunter2-secret" not in message
    assert "PostgreSQL (QPQ_DATABASE_URL)" in message


async def test_wrong_password_error_names_the_cause_not_the_password(
        pg_cluster: PostgresCluster) -> None:
    # trust auth accepts any password, so prove the scrubbing on a real driver message
    # that quotes the DSN back (a malformed one).
    dsn = "postgresql://qpq:p4ss-w0rd@127.0.0.1:notaport/qpq"
    try:
        psycopg.connect(dsn)
    except psycopg.Error as exc:
        text = describe_pg_error(exc, dsn)
    assert "p4ss-w0rd" not in text and "\n" not in text


async def test_closed_storage_refuses_clearly(pg_cluster: PostgresCluster) -> None:
    s = PostgresStorage(Secret(pg_cluster.new_database()))
    await s.open()
    await s.close()
    with pytest.raises(StorageError, match="storage is closed"):
        await s.get_meta("k")


async def test_outage_is_server_busy_and_ping_brings_the_pool_back() -> None:
    with postgres_cluster() as cluster:
        dsn = cluster.new_database().replace("qpq@", "qpq:pw-hidden@", 1)
        s = PostgresStorage(Secret(dsn), connect_timeout_s=1)
        await s.open()
        try:
            await s.create_account("a", b"pf", 1, 1.0)
            cluster.stop("fast")
            with pytest.raises(StorageUnavailable) as caught:
                await s.enqueue("a", ["a"], b"x", 1.0)
            assert caught.value.code == "server_busy"
            assert "127.0.0.1" not in str(caught.value)  # what a client sees
            assert "pw-hidden" not in caught.value.detail and "\n" not in caught.value.detail
            with pytest.raises(StorageUnavailable):
                await s.ping()
            cluster.start()
            deadline = time.monotonic() + 20
            while True:  # the server's probe pings once a second
                try:
                    await s.ping()
                    break
                except StorageUnavailable:
                    assert time.monotonic() < deadline, "the pool did not come back"
                    await asyncio.sleep(0.5)
            assert await s.existing_users(["a"]) == {"a"}  # nothing committed was lost
        finally:
            await s.close()


def _drop_backends(dsn: str) -> int:
    """Terminate every other session on the database (what a failover does to them)."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        rows = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                             ).fetchall()
    return len(rows)


async def test_a_connection_dropped_while_idle_is_replaced_before_a_request_gets_it(
        pg_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg_module, "_PROBE_IDLE_S", 0.2)
    dsn = pg_cluster.new_database()
    s = PostgresStorage(Secret(dsn), pool_size=2)
    await s.open()
    try:
        await s.create_account("a", b"pf", 1, 1.0)
        assert _drop_backends(dsn) >= 1
        await asyncio.sleep(0.3)  # idle past the probe threshold
        assert await s.existing_users(["a"]) == {"a"}  # probed, replaced, served
    finally:
        await s.close()


async def test_a_connection_dropped_while_busy_fails_one_request_then_is_discarded(
        pg_cluster: PostgresCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    # Used a moment ago, so handed out unprobed (a probe per request is a round trip):
    # the request gets server_busy (clients retry), the broken connection is dropped.
    monkeypatch.setattr(pg_module, "_PROBE_IDLE_S", 60.0)  # "a moment" on a slow box
    dsn = pg_cluster.new_database()
    s = PostgresStorage(Secret(dsn), pool_size=1)
    await s.open()
    try:
        await s.create_account("a", b"pf", 1, 1.0)
        _drop_backends(dsn)
        with pytest.raises(StorageUnavailable):
            await s.existing_users(["a"])
        assert await s.existing_users(["a"]) == {"a"}
    finally:
        await s.close()


async def test_single_statement_operations_run_outside_an_explicit_transaction(
        pg_cluster: PostgresCluster) -> None:
    """Autocommit: a one-statement write is committed by PostgreSQL before it answers
    (no BEGIN/COMMIT round trips), and a failed multi-statement one leaves nothing."""
    dsn = pg_cluster.new_database()
    s = PostgresStorage(Secret(dsn), pool_size=1)
    await s.open()
    try:
        await s.create_account("r", b"pf", 1, 1.0)
        ids = await s.enqueue("s", ["r"], b"x", 1.0)
        with psycopg.connect(dsn) as other:  # another session sees it at once
            assert other.execute("SELECT id FROM messages").fetchall() == [(ids[0],)]
        with pytest.raises(StorageError):
            await s.publish_identity_key("ghost", b"K" * 32, b"leaf", 1.0)
        assert await s.kt_leaves() == []
    finally:
        await s.close()
