"""The per-mailbox byte total the quota reads is kept by storage, exact on every backend.

`mailbox_bytes` no longer sums the mailbox at each enqueue (O(mailbox)); storage keeps a
total updated in the same transaction as each insert and delete. These tests compare it
with a full recount of what is stored (payload bytes in the SQL backends, queue file
bytes in the file backend) through enqueue, relayed enqueue, ack (a device's queue
emptied by unlink and a federation outbox's expired entries are acks too), a reopen,
and a database (SQLCipher, PostgreSQL) migrated from before the total existed.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from qpq_server.secrets import Secret
from qpq_server.storage.base import Storage
from qpq_server.storage.migrations import MIGRATIONS
from qpq_server.storage.pg_migrations import PG_MIGRATIONS
from qpq_server.storage.postgres import PostgresStorage
from qpq_server.storage.sqlcipher import connect_sqlcipher, migrate
from tests.helpers.postgres import PostgresCluster
from tests.storage.conftest import make_factory

KEY = Secret("ab" * 32)


def _recount(backend: str, directory: Path, dsn: str, mailbox: str) -> int:
    if backend == "sqlcipher":
        conn = connect_sqlcipher(directory / "qpq.db", KEY)
        try:
            (total,) = conn.execute("SELECT coalesce(sum(length(payload)), 0) FROM messages"
                                    " WHERE recipient = ?", (mailbox,)).fetchone()
        finally:
            conn.close()
        return int(total)
    if backend == "postgres":
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT coalesce(sum(octet_length(payload)), 0) FROM messages"
                               " WHERE recipient = %s", (mailbox,)).fetchone()
        assert row is not None
        return int(row[0])
    queue = directory / "store" / "queues" / f"u-{mailbox}"
    return sum(p.stat().st_size for p in queue.iterdir()) if queue.is_dir() else 0


async def _assert_exact(storage: Storage, backend: str, directory: Path, dsn: str,
                        mailboxes: list[str]) -> None:
    usage = await storage.mailbox_bytes(mailboxes)
    for mailbox in mailboxes:
        assert usage.get(mailbox, 0) == _recount(backend, directory, dsn, mailbox), mailbox


async def test_the_total_stays_exact(backend: str, tmp_path: Path,
                                     request: pytest.FixtureRequest) -> None:
    dsn = ""
    if backend == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
        dsn = cluster.new_database()
    make = make_factory(backend, tmp_path, dsn)
    boxes = ["bob", "bob#dev2", "carol", "outbox@b.example"]
    storage = make()
    await storage.open()
    try:
        assert await storage.mailbox_bytes(boxes) == {}
        ids = await storage.enqueue("alice", ["bob", "bob#dev2"], b"x" * 100, 1.0)
        await storage.enqueue("alice", ["bob"], b"y" * 7, 2.0)
        await storage.enqueue("alice", ["carol", "outbox@b.example"], b"z" * 3000, 3.0)
        await storage.enqueue_relayed("b.example", 1, "dave@b.example", ["bob", "carol"],
                                      b"r" * 55, 4.0)
        assert await storage.enqueue_relayed("b.example", 1, "dave@b.example",
                                             ["bob", "carol"], b"r" * 55, 4.0) is None
        await _assert_exact(storage, backend, tmp_path, dsn, boxes)
        usage = await storage.mailbox_bytes(boxes)
        assert usage["bob"] > usage["bob#dev2"] > 0 and usage["carol"] > 3000

        await storage.ack("bob", [ids[0]])                 # an ordinary ack
        await storage.ack("bob", [ids[1], ids[0]])         # another queue's id, a repeat
        await _assert_exact(storage, backend, tmp_path, dsn, boxes)
        # device unlink empties that device's queue; an outbox entry expires: both acks
        for mailbox in ("bob#dev2", "outbox@b.example"):
            await storage.ack(mailbox, [m.id for m in await storage.fetch(mailbox, 100)])
        await _assert_exact(storage, backend, tmp_path, dsn, boxes)
        assert (await storage.mailbox_bytes(boxes)).get("bob#dev2", 0) == 0
    finally:
        await storage.close()

    reopened = make()  # a restart (and a restore, which reopens a copied store)
    await reopened.open()
    try:
        await _assert_exact(reopened, backend, tmp_path, dsn, boxes)
        await reopened.enqueue("alice", ["carol"], b"w" * 11, 5.0)
        await _assert_exact(reopened, backend, tmp_path, dsn, boxes)
    finally:
        await reopened.close()


def _usage_version() -> int:
    """The first SQLCipher schema version that keeps the total."""
    return next(i for i, sql in enumerate(MIGRATIONS, 1) if "mailbox_usage" in sql)


def test_a_sqlcipher_database_from_before_the_total_is_counted_at_migration(
        tmp_path: Path) -> None:
    conn = connect_sqlcipher(tmp_path / "qpq.db", KEY)
    try:
        for sql in MIGRATIONS[: _usage_version() - 1]:
            conn.executescript(sql)
        conn.execute(f"PRAGMA user_version = {_usage_version() - 1}")
        conn.executemany("INSERT INTO messages(recipient, sender, payload, sent_at)"
                         " VALUES (?, ?, ?, ?)",
                         [("bob", "a", b"p" * n, 1.0) for n in (1, 20, 300)])
        conn.commit()
        migrate(conn)
        assert conn.execute("SELECT recipient, bytes FROM mailbox_usage").fetchall() == [
            ("bob", 321)]
    finally:
        conn.close()


async def test_a_postgres_database_from_before_the_total_is_counted_at_migration(
        pg_cluster: PostgresCluster) -> None:
    dsn = pg_cluster.new_database()
    version = next(i for i, sql in enumerate(PG_MIGRATIONS, 1) if "mailbox_usage" in sql)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                     " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        for n, sql in enumerate(PG_MIGRATIONS[: version - 1], 1):
            conn.execute(sql)  # type: ignore[call-overload]
            conn.execute("INSERT INTO schema_version(version) VALUES (%s)", (n,))
        for size in (1, 20, 300):
            conn.execute("INSERT INTO messages(recipient, sender, payload, sent_at)"
                         " VALUES ('bob', 'a', %s, 1.0)", (b"p" * size,))
    storage = PostgresStorage(Secret(dsn), pool_size=2)
    await storage.open()  # migrates
    try:
        assert await storage.mailbox_bytes(["bob", "nobody"]) == {"bob": 321}
    finally:
        await storage.close()
