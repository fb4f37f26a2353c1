"""PostgreSQL storage: several qpq nodes (and worker processes) share one database.

psycopg 3 with its async connection pool (`[storage] pool_size` connections per process).
Every write is one transaction, and a coroutine returns only after PostgreSQL acknowledged
its COMMIT (with the server's default `synchronous_commit = on`, that is after the WAL
flush), so an acknowledged message survives a crash of either side.

Round trips are what a request costs here (bench/README.md, "PostgreSQL profile"), so:
connections are in autocommit mode and an operation that is one statement is sent as
one (PostgreSQL commits it before answering, as durable as BEGIN/COMMIT around it, at a
third of the round trips); only operations of several statements open a transaction.
A pooled connection is probed before use only when it sat idle for a while: one that
died with the server while in use is discarded when it comes back broken.

The DSN (`QPQ_DATABASE_URL`) holds a password: it is passed to psycopg and nowhere else.
Errors become one-line `StorageError`s built from psycopg's message with the password
scrubbed out; the DSN itself is never part of one.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from qpq_server.errors import StorageError, StorageUnavailable, UserExists
from qpq_server.secrets import Secret
from qpq_server.storage.base import (
    Account,
    CommitObserver,
    Expected,
    KeyPackage,
    KtLeaf,
    StoredMessage,
    device_set_changed,
)
from qpq_server.storage.pg_migrations import PG_MIGRATIONS, PG_SCHEMA_VERSION

__all__ = ["PostgresStorage", "describe_pg_error", "dsn_password"]

T = TypeVar("T")
Conn = AsyncConnection[Any]

# Any 64-bit constants will do: they name the advisory locks that serialise, across every
# node, schema migrations and key-transparency appends.
_MIGRATION_LOCK = 0x717071_0001
_KT_APPEND_LOCK = 0x717071_0002
_PING_TIMEOUT_S = 1.0
# A connection used this recently is handed out unprobed (a probe is a round trip).
_PROBE_IDLE_S = 1.0


def dsn_password(dsn: str) -> str:
    """The password inside a DSN (URL or key=value form), '' if none or unparsable."""
    try:
        return str(conninfo_to_dict(dsn).get("password") or "")
    except psycopg.Error:
        return ""


def describe_pg_error(exc: BaseException, dsn: str) -> str:
    """The first line of a driver error, with the DSN and its password scrubbed out."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    for secret in (dsn, dsn_password(dsn)):
        if secret:
            text = text.replace(secret, "***")
    return text or type(exc).__name__


class PostgresStorage:
    def __init__(self, dsn: Secret, *, pool_size: int = 4, connect_timeout_s: float = 5.0,
                 on_commit: CommitObserver | None = None) -> None:
        self._dsn = dsn
        self._pool_size = max(1, pool_size)
        self._timeout = connect_timeout_s
        self._on_commit = on_commit
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._last_used: weakref.WeakKeyDictionary[Conn, float] = weakref.WeakKeyDictionary()

    # -- lifecycle ---------------------------------------------------------------------
    def _new_pool(self) -> AsyncConnectionPool[Conn]:
        return AsyncConnectionPool(
            self._dsn.reveal(), min_size=1, max_size=self._pool_size, open=False,
            timeout=self._timeout, name="qpq",
            # A connection that died with the server (restart, failover) while idle is
            # noticed and replaced when taken from the pool, not handed to a request.
            check=self._check_idle,
            kwargs={"connect_timeout": max(1, int(self._timeout)), "autocommit": True},
        )

    async def _check_idle(self, conn: Conn) -> None:
        if time.monotonic() - self._last_used.get(conn, 0.0) > _PROBE_IDLE_S:
            await AsyncConnectionPool.check_connection(conn)

    async def _open_pool(self) -> AsyncConnectionPool[Conn]:
        pool = self._new_pool()
        try:
            await pool.open(wait=True, timeout=self._timeout)
        except (PoolTimeout, psycopg.Error) as exc:
            await pool.close()
            raise StorageError(self._unreachable(exc)) from None
        return pool

    async def open(self) -> None:
        self._pool = await self._open_pool()
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def ping(self) -> None:
        """Raise StorageError unless the database answers a trivial query now.

        Called every second by the server's storage probe. After an outage the pool
        retries its connections with an uncapped exponential backoff (a minute apart
        after a long outage); when the database answers a fresh connection while the
        pool still cannot, the pool is replaced, so service resumes within a probe or two.
        """
        try:
            await self._run(lambda conn: _fetchone(conn, "SELECT 1"), write=False,
                            timeout=_PING_TIMEOUT_S)
            return
        except StorageUnavailable:
            if not await self._database_answers():
                raise
        old, self._pool = self._pool, await self._open_pool()
        if old is not None:
            await old.close(timeout=1.0)  # requests holding its connections finish first
        await self._run(lambda conn: _fetchone(conn, "SELECT 1"), write=False,
                        timeout=_PING_TIMEOUT_S)

    async def _database_answers(self) -> bool:
        try:
            conn = await AsyncConnection.connect(self._dsn.reveal(),
                                                 connect_timeout=int(_PING_TIMEOUT_S))
        except psycopg.Error:
            return False
        await conn.close()
        return True

    def _unreachable(self, exc: BaseException) -> str:
        if isinstance(exc, PoolTimeout):
            return (f"PostgreSQL (QPQ_DATABASE_URL) did not accept a connection within "
                    f"{self._timeout:g} s")
        return f"PostgreSQL (QPQ_DATABASE_URL): {describe_pg_error(exc, self._dsn.reveal())}"

    async def _migrate(self) -> None:
        pool = self._pool
        assert pool is not None
        try:
            async with pool.connection() as conn:
                # Two nodes starting together must not both apply a migration: a session
                # lock, held across the migrations, each committed in its own transaction.
                await conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
                try:
                    await self._apply_migrations(conn)
                finally:
                    await conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
        except PoolTimeout as exc:
            raise StorageError(self._unreachable(exc)) from None
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL migration failed: "
                               f"{describe_pg_error(exc, self._dsn.reveal())}") from None

    @staticmethod
    async def _apply_migrations(conn: Conn) -> None:
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                           " version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL"
                           " DEFAULT now())")
        row = await _fetchone(conn, "SELECT max(version) FROM schema_version")
        version = int(row[0]) if row and row[0] is not None else 0
        if version > PG_SCHEMA_VERSION:
            raise StorageError(f"database schema version {version} is newer than this "
                               f"server ({PG_SCHEMA_VERSION})")
        for target in range(version, PG_SCHEMA_VERSION):
            async with conn.transaction():  # each migration all-or-nothing
                await conn.execute(PG_MIGRATIONS[target])
                await conn.execute("INSERT INTO schema_version(version) VALUES (%s)",
                                   (target + 1,))

    # -- plumbing ----------------------------------------------------------------------
    async def _run(self, fn: Callable[[Conn], Awaitable[T]], *, write: bool,
                   timeout: float | None = None, atomic: bool = False) -> T:
        """Run fn on a pooled (autocommit) connection: as it is when it sends one
        statement, in one transaction when `atomic` (several statements). A write
        returns only after PostgreSQL acknowledged the commit."""
        pool = self._pool
        if pool is None:
            raise StorageError("storage is closed")
        try:
            async with pool.connection(timeout=timeout) as conn:
                started = time.perf_counter()
                if atomic:  # several statements: all or none
                    async with conn.transaction():
                        result = await fn(conn)
                else:
                    result = await fn(conn)
                self._last_used[conn] = time.monotonic()
                if write and self._on_commit is not None:
                    self._on_commit(time.perf_counter() - started)
                return result
        except (PoolTimeout, psycopg.OperationalError) as exc:
            # Connection-level: the database is away (restart, network); the client is
            # told to retry, the operator's log and /readyz get the detail.
            raise StorageUnavailable(self._unreachable(exc)) from None
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL: {describe_pg_error(exc, self._dsn.reveal())}"
                               ) from None

    # -- accounts ----------------------------------------------------------------------
    async def create_account(self, username: str, password_file: bytes, setup_version: int,
                             now: float) -> None:
        async def run(conn: Conn) -> bool:
            cur = await conn.execute(
                "INSERT INTO accounts(username, password_file, setup_version, created_at)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (username) DO NOTHING",
                (username, password_file, setup_version, now))
            return cur.rowcount == 1

        if not await self._run(run, write=True):
            raise UserExists(f"username {username!r} is taken")

    async def get_account(self, username: str) -> Account | None:
        async def run(conn: Conn) -> Account | None:
            row = await _fetchone(
                conn, "SELECT username, password_file, setup_version, identity_key, created_at"
                " FROM accounts WHERE username = %s", (username,))
            return _account(row)

        return await self._run(run, write=False)

    async def account_with_meta(self, username: str,
                                key: str) -> tuple[Account | None, str | None]:
        async def run(conn: Conn) -> tuple[Account | None, str | None]:
            # One row whether or not either exists: one round trip for both reads.
            row = await _fetchone(
                conn, "SELECT a.username, a.password_file, a.setup_version, a.identity_key,"
                " a.created_at, m.value FROM (SELECT 1) AS one"
                " LEFT JOIN accounts AS a ON a.username = %s"
                " LEFT JOIN meta AS m ON m.key = %s", (username, key))
            return _account(row if row[0] is not None else None), \
                (str(row[5]) if row[5] is not None else None)

        return await self._run(run, write=False)

    async def update_password_file(self, username: str, password_file: bytes,
                                   setup_version: int) -> None:
        async def run(conn: Conn) -> None:
            await conn.execute("UPDATE accounts SET password_file = %s, setup_version = %s"
                               " WHERE username = %s", (password_file, setup_version, username))

        await self._run(run, write=True)

    async def existing_users(self, usernames: Sequence[str]) -> set[str]:
        names = list(dict.fromkeys(usernames))

        async def run(conn: Conn) -> set[str]:
            cur = await conn.execute("SELECT username FROM accounts WHERE username = ANY(%s)",
                                     (names,))
            return {str(r[0]) for r in await cur.fetchall()}

        return await self._run(run, write=False) if names else set()

    @staticmethod
    async def _swap_identity_key(conn: Conn, username: str, identity_key: bytes,
                                 expected: Expected | None) -> int:
        """Rows changed; a lost compare-and-set raises. The UPDATE waits for a
        concurrent one on the row and then re-checks its condition on the new value."""
        if expected is None:
            cur = await conn.execute("UPDATE accounts SET identity_key = %s WHERE username = %s",
                                     (identity_key, username))
            return max(cur.rowcount, 0)
        cur = await conn.execute(
            "UPDATE accounts SET identity_key = %s WHERE username = %s"
            " AND identity_key IS NOT DISTINCT FROM %s::bytea",
            (identity_key, username, expected.identity_key))
        if cur.rowcount == 1:
            return 1
        if await _fetchone(conn, "SELECT 1 FROM accounts WHERE username = %s", (username,)):
            raise device_set_changed(username)
        return 0

    async def set_identity_key(self, username: str, identity_key: bytes,
                               expected: Expected | None = None) -> None:
        async def run(conn: Conn) -> None:
            await self._swap_identity_key(conn, username, identity_key, expected)

        await self._run(run, write=True)

    async def publish_identity_key(self, username: str, identity_key: bytes, kt_leaf: bytes,
                                   now: float, expected: Expected | None = None) -> int:
        async def run(conn: Conn) -> int:
            if await self._swap_identity_key(conn, username, identity_key, expected) != 1:
                raise StorageError(f"no account {username!r} to publish a key for")
            # Appends from every node queue on one lock, so indexes stay consecutive; the
            # key and its leaf commit together or not at all.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_KT_APPEND_LOCK,))
            row = await _fetchone(conn, "SELECT coalesce(max(idx) + 1, 0) FROM kt_leaves")
            index = int(row[0]) if row else 0
            await conn.execute("INSERT INTO kt_leaves(idx, username, leaf, created_at)"
                               " VALUES (%s, %s, %s, %s)", (index, username, kt_leaf, now))
            return index

        return await self._run(run, write=True, atomic=True)

    async def kt_leaves(self, start: int = 0) -> list[KtLeaf]:
        async def run(conn: Conn) -> list[KtLeaf]:
            cur = await conn.execute("SELECT idx, username, leaf, created_at FROM kt_leaves"
                                     " WHERE idx >= %s ORDER BY idx", (start,))
            return [KtLeaf(int(r[0]), str(r[1]), bytes(r[2]), float(r[3]))
                    for r in await cur.fetchall()]

        return await self._run(run, write=False)

    # -- key packages ------------------------------------------------------------------
    async def add_key_packages(self, username: str, packages: Sequence[bytes]) -> int:
        async def run(conn: Conn) -> int:
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO key_packages(username, key_package) VALUES (%s, %s)",
                    [(username, p) for p in packages])
            return await _count(conn, "SELECT count(*) FROM key_packages WHERE username = %s",
                                (username,))

        return await self._run(run, write=True, atomic=True)

    async def take_key_package(self, username: str, prefix: bytes = b"") -> KeyPackage | None:
        async def run(conn: Conn) -> KeyPackage | None:
            # SKIP LOCKED: concurrent takers (on any node) each lock a different row, so a
            # one-time key is never handed to two senders and nobody waits on another.
            row = await _fetchone(
                conn, "DELETE FROM key_packages WHERE id = (SELECT id FROM key_packages"
                " WHERE username = %s AND substring(key_package from 1 for %s) = %s"
                " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)"
                " RETURNING id, key_package", (username, len(prefix), prefix))
            return KeyPackage(int(row[0]), bytes(row[1])) if row else None

        return await self._run(run, write=True)

    async def count_key_packages(self, username: str, prefix: bytes = b"") -> int:
        async def run(conn: Conn) -> int:
            return await _count(conn, "SELECT count(*) FROM key_packages WHERE username = %s"
                                " AND substring(key_package from 1 for %s) = %s",
                                (username, len(prefix), prefix))

        return await self._run(run, write=False)

    # -- delivery ----------------------------------------------------------------------
    async def enqueue(self, sender: str, recipients: Sequence[str], payload: bytes,
                      now: float) -> list[int]:
        async def run(conn: Conn) -> list[int]:
            # One statement (one round trip, one commit) for a message to many recipients,
            # the payload sent once. Rows go in in name order: each insert's trigger locks
            # its mailbox_usage row, and one order for every transaction means two
            # enqueues never deadlock. Ids drawn in that order ascend, so the k-th smallest
            # id belongs to the k-th recipient by name.
            order = sorted(range(len(recipients)), key=recipients.__getitem__)
            cur = await conn.execute(
                "INSERT INTO messages(recipient, sender, payload, sent_at)"
                " SELECT r, %s, %s, %s FROM unnest(%s::text[]) WITH ORDINALITY AS t(r, n)"
                " ORDER BY n RETURNING id",
                (sender, payload, now, [recipients[i] for i in order]))
            drawn = sorted(int(r[0]) for r in await cur.fetchall())
            ids = [0] * len(recipients)
            for i, message_id in zip(order, drawn, strict=True):
                ids[i] = message_id
            return ids

        return await self._run(run, write=True) if recipients else []

    async def fetch(self, recipient: str, limit: int,
                    max_bytes: int | None = None) -> list[StoredMessage]:
        async def run(conn: Conn) -> list[StoredMessage]:
            # The running total is computed by the server, so a page bounded by bytes
            # never ships the rest of the mailbox over the wire.
            cur = await conn.execute(
                "SELECT id, recipient, sender, payload, sent_at FROM ("
                " SELECT id, recipient, sender, payload, sent_at,"
                "  sum(octet_length(payload)) OVER (ORDER BY id) AS running,"
                "  row_number() OVER (ORDER BY id) AS n"
                " FROM (SELECT * FROM messages WHERE recipient = %s ORDER BY id LIMIT %s) AS m"
                ") AS page WHERE n = 1 OR %s::bigint IS NULL OR running <= %s::bigint"
                " ORDER BY id", (recipient, limit, max_bytes, max_bytes))
            messages = []
            for r in await cur.fetchall():
                messages.append(StoredMessage(int(r[0]), str(r[1]), str(r[2]), bytes(r[3]),
                                              float(r[4])))
            return messages

        return await self._run(run, write=False)

    async def mailbox_bytes(self, recipients: Sequence[str]) -> dict[str, int]:
        names = list(dict.fromkeys(recipients))

        async def run(conn: Conn) -> dict[str, int]:
            cur = await conn.execute(
                "SELECT recipient, bytes FROM mailbox_usage"
                " WHERE recipient = ANY(%s) AND bytes > 0", (names,))
            return {str(r[0]): int(r[1]) for r in await cur.fetchall()}

        return await self._run(run, write=False) if names else {}

    async def ack(self, recipient: str, message_ids: Sequence[int]) -> int:
        ids = list(dict.fromkeys(int(i) for i in message_ids))

        async def run(conn: Conn) -> int:
            cur = await conn.execute(
                "DELETE FROM messages WHERE recipient = %s AND id = ANY(%s::bigint[])",
                (recipient, ids))
            return max(cur.rowcount, 0)

        return await self._run(run, write=True) if ids else 0

    async def mailbox_count(self, recipient: str) -> int:
        async def run(conn: Conn) -> int:
            return await _count(conn, "SELECT count(*) FROM messages WHERE recipient = %s",
                                (recipient,))

        return await self._run(run, write=False)

    async def enqueue_relayed(self, origin: str, relay_id: int, sender: str,
                              recipients: Sequence[str], payload: bytes,
                              now: float) -> list[int] | None:
        async def run(conn: Conn) -> list[int] | None:
            # ON CONFLICT DO NOTHING waits for a concurrent insert of the same id to
            # commit or roll back, so two nodes cannot both deliver one relay.
            seen = await conn.execute(
                "INSERT INTO relays_seen(origin, relay_id, seen_at) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING", (origin, relay_id, now))
            if seen.rowcount != 1:
                return None
            ids = [0] * len(recipients)
            for i in sorted(range(len(recipients)), key=recipients.__getitem__):
                row = await _fetchone(conn, "INSERT INTO messages(recipient, sender, payload,"
                                      " sent_at) VALUES (%s, %s, %s, %s) RETURNING id",
                                      (recipients[i], sender, payload, now))
                ids[i] = int(row[0])  # name order, as in enqueue (no deadlock)
            return ids

        return await self._run(run, write=True, atomic=True)

    async def forget_relays(self, before: float) -> int:
        async def run(conn: Conn) -> int:
            cur = await conn.execute("DELETE FROM relays_seen WHERE seen_at < %s", (before,))
            return max(cur.rowcount, 0)

        return await self._run(run, write=True)

    async def queue_depth(self) -> int:
        async def run(conn: Conn) -> int:
            return await _count(conn, "SELECT count(*) FROM messages")

        return await self._run(run, write=False)

    # -- metadata ----------------------------------------------------------------------
    async def get_meta(self, key: str) -> str | None:
        async def run(conn: Conn) -> str | None:
            row = await _fetchone(conn, "SELECT value FROM meta WHERE key = %s", (key,))
            return str(row[0]) if row else None

        return await self._run(run, write=False)

    async def set_meta(self, key: str, value: str) -> None:
        async def run(conn: Conn) -> None:
            await conn.execute("INSERT INTO meta(key, value) VALUES (%s, %s)"
                               " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                               (key, value))

        await self._run(run, write=True)

    async def meta_with_prefix(self, prefix: str) -> dict[str, str]:
        async def run(conn: Conn) -> dict[str, str]:
            cur = await conn.execute("SELECT key, value FROM meta WHERE starts_with(key, %s)",
                                     (prefix,))
            return {str(k): str(v) for k, v in await cur.fetchall()}

        return await self._run(run, write=False)


def _account(row: Any) -> Account | None:
    if row is None:
        return None
    identity = bytes(row[3]) if row[3] is not None else None
    return Account(str(row[0]), bytes(row[1]), int(row[2]), identity, float(row[4]))


async def _fetchone(conn: Conn, sql: str, params: Sequence[Any] = ()) -> Any:
    cur = await conn.execute(sql, params)  # type: ignore[arg-type]
    return await cur.fetchone()


async def _count(conn: Conn, sql: str, params: Sequence[Any] = ()) -> int:
    row = await _fetchone(conn, sql, params)
    return int(row[0]) if row else 0
