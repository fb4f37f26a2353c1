"""SQLCipher storage: WAL, synchronous=FULL, one writer thread with grouped commits,
short reads inline on the event loop, and a bounded pool of reader threads for long ones.

Why a single writer: SQLite allows one writer at a time anyway; funnelling writes
through one thread lets concurrent enqueues share a commit (one fsync for many
messages) while each is still acknowledged only after its commit is durable.

Why short reads inline: an indexed WAL read takes microseconds, while a hop to a pool
thread and back costs two wake-ups and a GIL handover each way (under load the event
loop then waits up to a switch interval for the GIL: issue 17's profile). WAL readers
never wait for the writer, so the loop does not block on it. Reads whose size depends on
the data (a fetch page above `_INLINE_READ_BYTES`, the KT log, a full count) still go to
the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlcipher3

from qpq_server.errors import StorageError, UserExists, WrongDatabaseKey
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
from qpq_server.storage.migrations import MIGRATIONS, SCHEMA_VERSION

__all__ = ["SqlCipherStorage", "connect_sqlcipher", "key_pragma"]

T = TypeVar("T")
Connection = Any  # sqlcipher3 ships no type stubs
_INLINE_READ_BYTES = 256 * 1024
"""A fetch page up to this many payload bytes is read on the event loop; above it the
read is redone in the pool (decrypting megabytes would stall every connection)."""
_HEX_KEY = re.compile(r"^[0-9a-fA-F]{64}\Z")


def key_pragma(db_key: Secret) -> str:
    """A 64-hex-digit key is used as a raw key (no KDF); anything else as a passphrase."""
    value = db_key.reveal()
    if _HEX_KEY.match(value):
        return f"PRAGMA key = \"x'{value}'\""
    return "PRAGMA key = '" + value.replace("'", "''") + "'"


def connect_sqlcipher(path: Path, db_key: Secret, *, busy_timeout_ms: int = 5000,
                      wal_autocheckpoint: int = 2000) -> Connection:
    """Open and key a connection; raise WrongDatabaseKey if the key does not open it."""
    conn = sqlcipher3.connect(str(path), isolation_level=None, check_same_thread=False)
    try:
        conn.execute(key_pragma(db_key))
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlcipher3.DatabaseError as exc:
        conn.close()
        raise WrongDatabaseKey(
            f"QPQ_DB_KEY does not open {path} (wrong key, or not a qpq database)"
        ) from exc
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL: with NORMAL the last commits before a power loss can roll back.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(f"PRAGMA wal_autocheckpoint = {int(wal_autocheckpoint)}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _statements(script: str) -> list[str]:
    """`script` cut into whole statements (a trigger body holds `;` of its own), so each
    runs inside the migration's transaction (`executescript` would commit first)."""
    statements, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlcipher3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending)
            pending = ""
    return statements


def migrate(conn: Connection) -> int:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"database schema version {version} is newer than this server ({SCHEMA_VERSION})"
        )
    for target in range(version, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        # Read the version again under the write lock: several worker processes may open
        # a new database at once, and only one may apply each step.
        (current,) = conn.execute("PRAGMA user_version").fetchone()
        if current > target:
            conn.execute("COMMIT")
            continue
        try:
            for statement in _statements(MIGRATIONS[target]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


@dataclass
class _WriteJob:
    fn: Callable[[Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


class SqlCipherStorage:
    def __init__(self, path: Path, db_key: Secret, *, pool_size: int = 4,
                 max_batch: int = 64, busy_timeout_ms: int = 5000,
                 wal_autocheckpoint: int = 2000,
                 on_commit: CommitObserver | None = None) -> None:
        self._path = path
        self._key = db_key
        self._readers = max(1, pool_size - 1)  # one connection is the writer's
        self._max_batch = max_batch
        self._busy_timeout_ms = busy_timeout_ms
        self._wal_autocheckpoint = wal_autocheckpoint
        self._on_commit = on_commit
        self._jobs: queue.Queue[_WriteJob | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._writer_conn: Connection | None = None
        self._local = threading.local()
        self._reader_conns: list[Connection] = []
        self._reader_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._loop_conn: Connection | None = None  # the event loop's own reader

    # -- lifecycle ---------------------------------------------------------------------
    def _connect(self) -> Connection:
        return connect_sqlcipher(self._path, self._key, busy_timeout_ms=self._busy_timeout_ms,
                                 wal_autocheckpoint=self._wal_autocheckpoint)

    async def open(self) -> None:
        def setup() -> Connection:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            for suffix in ("", "-wal", "-shm"):  # files made by older versions or by hand
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(f"{self._path}{suffix}", 0o600)
            conn = self._connect()
            migrate(conn)
            return conn

        self._writer_conn = await asyncio.to_thread(setup)
        self._loop_conn = await asyncio.to_thread(self._connect)
        self._pool = ThreadPoolExecutor(self._readers, thread_name_prefix="qpq-db-read")
        self._writer = threading.Thread(target=self._write_loop, name="qpq-db-write",
                                        daemon=True)
        self._writer.start()

    async def close(self) -> None:
        if self._writer is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        if self._loop_conn is not None:
            self._loop_conn.close()
            self._loop_conn = None
        if self._writer_conn is not None:
            self._writer_conn.close()
            self._writer_conn = None

    # -- plumbing ----------------------------------------------------------------------
    def _write_loop(self) -> None:
        conn = self._writer_conn
        assert conn is not None
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            self._run_batch(conn, batch)
            if stop:
                return

    def _run_batch(self, conn: Connection, batch: list[_WriteJob]) -> None:
        results: list[tuple[_WriteJob, Any, BaseException | None]] = []
        started = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                # A savepoint per job: one job's failure (say a taken username) must not
                # roll back the others sharing this commit.
                conn.execute("SAVEPOINT job")
                try:
                    result = job.fn(conn)
                    conn.execute("RELEASE job")
                    results.append((job, result, None))
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    results.append((job, None, exc))
            conn.execute("COMMIT")
        except Exception as exc:
            with contextlib.suppress(Exception):  # already failing: report the first error
                conn.execute("ROLLBACK")
            error = StorageError(f"commit failed: {exc}")
            for job in batch:
                job.loop.call_soon_threadsafe(_settle, job.future, None, error)
            return
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - started)
        for job, result, job_error in results:
            job.loop.call_soon_threadsafe(_settle, job.future, result, job_error)

    async def _write(self, fn: Callable[[Connection], T]) -> T:
        if self._writer is None:
            raise StorageError("storage is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_WriteJob(fn, loop, future))
        return await future

    def _reader(self) -> Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    def _read_inline(self, fn: Callable[[Connection], T]) -> T:
        """A short read on the event loop's own connection (see the module docstring)."""
        if self._loop_conn is None:
            raise StorageError("storage is closed")
        return fn(self._loop_conn)

    async def _read(self, fn: Callable[[Connection], T]) -> T:
        if self._pool is None:
            raise StorageError("storage is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(self._reader()))

    # -- accounts ----------------------------------------------------------------------
    async def create_account(self, username: str, password_file: bytes, setup_version: int,
                             now: float) -> None:
        def run(conn: Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO accounts(username, password_file, setup_version, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (username, password_file, setup_version, now),
                )
            except sqlcipher3.IntegrityError:
                raise UserExists(f"username {username!r} is taken") from None

        await self._write(run)

    async def get_account(self, username: str) -> Account | None:
        def run(conn: Connection) -> Account | None:
            row = conn.execute(
                "SELECT username, password_file, setup_version, identity_key, created_at"
                " FROM accounts WHERE username = ?",
                (username,),
            ).fetchone()
            return Account(*row) if row else None

        return self._read_inline(run)

    async def account_with_meta(self, username: str,
                                key: str) -> tuple[Account | None, str | None]:
        return await self.get_account(username), await self.get_meta(key)

    async def update_password_file(self, username: str, password_file: bytes,
                                   setup_version: int) -> None:
        await self._write(lambda conn: conn.execute(
            "UPDATE accounts SET password_file = ?, setup_version = ? WHERE username = ?",
            (password_file, setup_version, username),
        ))

    async def existing_users(self, usernames: Sequence[str]) -> set[str]:
        names = list(dict.fromkeys(usernames))

        def run(conn: Connection) -> set[str]:
            marks = ",".join("?" * len(names))
            rows = conn.execute(
                f"SELECT username FROM accounts WHERE username IN ({marks})",  # noqa: S608
                names,
            ).fetchall()
            return {r[0] for r in rows}

        return self._read_inline(run) if names else set()

    @staticmethod
    def _swap_identity_key(conn: Connection, username: str, identity_key: bytes,
                           expected: Expected | None) -> int:
        """Rows changed; a lost compare-and-set raises (one writer: the check and the
        write are one step)."""
        if expected is None:
            return int(conn.execute("UPDATE accounts SET identity_key = ? WHERE username = ?",
                                    (identity_key, username)).rowcount)
        changed = int(conn.execute(
            "UPDATE accounts SET identity_key = ? WHERE username = ? AND identity_key IS ?",
            (identity_key, username, expected.identity_key)).rowcount)
        if changed == 0 and conn.execute("SELECT 1 FROM accounts WHERE username = ?",
                                         (username,)).fetchone():
            raise device_set_changed(username)
        return changed

    async def set_identity_key(self, username: str, identity_key: bytes,
                               expected: Expected | None = None) -> None:
        await self._write(lambda conn: self._swap_identity_key(conn, username, identity_key,
                                                               expected))

    async def publish_identity_key(self, username: str, identity_key: bytes, kt_leaf: bytes,
                                   now: float, expected: Expected | None = None) -> int:
        def run(conn: Connection) -> int:
            if self._swap_identity_key(conn, username, identity_key, expected) != 1:
                raise StorageError(f"no account {username!r} to publish a key for")
            (index,) = conn.execute("SELECT coalesce(max(idx) + 1, 0) FROM kt_leaves").fetchone()
            conn.execute("INSERT INTO kt_leaves(idx, username, leaf, created_at)"
                         " VALUES (?, ?, ?, ?)", (index, username, kt_leaf, now))
            return int(index)

        return await self._write(run)

    async def kt_leaves(self, start: int = 0) -> list[KtLeaf]:
        def run(conn: Connection) -> list[KtLeaf]:
            rows = conn.execute("SELECT idx, username, leaf, created_at FROM kt_leaves"
                                " WHERE idx >= ? ORDER BY idx", (start,)).fetchall()
            return [KtLeaf(int(r[0]), r[1], bytes(r[2]), float(r[3])) for r in rows]

        return await self._read(run)

    # -- key packages ------------------------------------------------------------------
    async def add_key_packages(self, username: str, packages: Sequence[bytes]) -> int:
        def run(conn: Connection) -> int:
            conn.executemany(
                "INSERT INTO key_packages(username, key_package) VALUES (?, ?)",
                [(username, p) for p in packages],
            )
            (count,) = conn.execute(
                "SELECT count(*) FROM key_packages WHERE username = ?", (username,)
            ).fetchone()
            return int(count)

        return await self._write(run)

    async def take_key_package(self, username: str, prefix: bytes = b"") -> KeyPackage | None:
        def run(conn: Connection) -> KeyPackage | None:
            # Inside the writer's transaction: the select and delete are atomic, so a
            # one-time key is never handed to two senders.
            row = conn.execute(
                "SELECT id, key_package FROM key_packages WHERE username = ?"
                " AND substr(key_package, 1, ?) = ? ORDER BY id LIMIT 1",
                (username, len(prefix), prefix),
            ).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM key_packages WHERE id = ?", (row[0],))
            return KeyPackage(int(row[0]), bytes(row[1]))

        return await self._write(run)

    async def count_key_packages(self, username: str, prefix: bytes = b"") -> int:
        def run(conn: Connection) -> int:
            (count,) = conn.execute(
                "SELECT count(*) FROM key_packages WHERE username = ?"
                " AND substr(key_package, 1, ?) = ?", (username, len(prefix), prefix)
            ).fetchone()
            return int(count)

        return self._read_inline(run)

    # -- delivery ----------------------------------------------------------------------
    async def enqueue(self, sender: str, recipients: Sequence[str], payload: bytes,
                      now: float) -> list[int]:
        def run(conn: Connection) -> list[int]:
            ids = []
            for recipient in recipients:
                cur = conn.execute(
                    "INSERT INTO messages(recipient, sender, payload, sent_at)"
                    " VALUES (?, ?, ?, ?)",
                    (recipient, sender, payload, now),
                )
                ids.append(int(cur.lastrowid))
            return ids

        return await self._write(run)

    async def fetch(self, recipient: str, limit: int,
                    max_bytes: int | None = None) -> list[StoredMessage]:
        def page(conn: Connection, budget: int | None) -> list[StoredMessage] | None:
            """The page, or None once it outgrows `budget` bytes (redo it in the pool)."""
            cursor = conn.execute(
                "SELECT id, recipient, sender, payload, sent_at FROM messages"
                " WHERE recipient = ? ORDER BY id LIMIT ?",
                (recipient, limit),
            )
            messages: list[StoredMessage] = []
            total = 0
            # Row by row, so a page bounded by bytes never loads the rest of the mailbox.
            while (row := cursor.fetchone()) is not None:
                total += len(row[3])
                if messages and max_bytes is not None and total > max_bytes:
                    break
                if budget is not None and total > budget:
                    cursor.close()
                    return None
                messages.append(StoredMessage(int(row[0]), row[1], row[2], bytes(row[3]),
                                              float(row[4])))
            cursor.close()
            return messages

        small = self._read_inline(lambda conn: page(conn, _INLINE_READ_BYTES))
        if small is not None:
            return small
        return await self._read(lambda conn: page(conn, None) or [])

    async def mailbox_bytes(self, recipients: Sequence[str]) -> dict[str, int]:
        names = list(dict.fromkeys(recipients))

        def run(conn: Connection) -> dict[str, int]:
            marks = ",".join("?" * len(names))
            rows = conn.execute(
                f"SELECT recipient, bytes FROM mailbox_usage"  # noqa: S608
                f" WHERE recipient IN ({marks}) AND bytes > 0", names).fetchall()
            return {str(r[0]): int(r[1]) for r in rows}

        return self._read_inline(run) if names else {}

    async def ack(self, recipient: str, message_ids: Sequence[int]) -> int:
        ids = list(message_ids)

        def run(conn: Connection) -> int:
            deleted = 0
            for chunk_start in range(0, len(ids), 500):
                chunk = ids[chunk_start : chunk_start + 500]
                marks = ",".join("?" * len(chunk))
                cur = conn.execute(
                    f"DELETE FROM messages WHERE recipient = ? AND id IN ({marks})",  # noqa: S608
                    [recipient, *chunk],
                )
                deleted += cur.rowcount
            return deleted

        return await self._write(run) if ids else 0

    async def mailbox_count(self, recipient: str) -> int:
        def run(conn: Connection) -> int:
            (count,) = conn.execute("SELECT count(*) FROM messages WHERE recipient = ?",
                                    (recipient,)).fetchone()
            return int(count)

        return await self._read(run)

    async def enqueue_relayed(self, origin: str, relay_id: int, sender: str,
                              recipients: Sequence[str], payload: bytes,
                              now: float) -> list[int] | None:
        def run(conn: Connection) -> list[int] | None:
            seen = conn.execute("INSERT OR IGNORE INTO relays_seen(origin, relay_id, seen_at)"
                                " VALUES (?, ?, ?)", (origin, relay_id, now))
            if seen.rowcount == 0:
                return None
            return [int(conn.execute(
                "INSERT INTO messages(recipient, sender, payload, sent_at) VALUES (?, ?, ?, ?)",
                (recipient, sender, payload, now)).lastrowid) for recipient in recipients]

        return await self._write(run)

    async def forget_relays(self, before: float) -> int:
        return int(await self._write(lambda conn: conn.execute(
            "DELETE FROM relays_seen WHERE seen_at < ?", (before,)).rowcount))

    async def queue_depth(self) -> int:
        def run(conn: Connection) -> int:
            (count,) = conn.execute("SELECT count(*) FROM messages").fetchone()
            return int(count)

        return await self._read(run)

    # -- metadata ----------------------------------------------------------------------
    async def get_meta(self, key: str) -> str | None:
        def run(conn: Connection) -> str | None:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return str(row[0]) if row else None

        return self._read_inline(run)

    async def meta_with_prefix(self, prefix: str) -> dict[str, str]:
        def run(conn: Connection) -> dict[str, str]:
            # Range scan on the primary key: every key k with prefix <= k < prefix + max.
            rows = conn.execute("SELECT key, value FROM meta WHERE key >= ? AND key < ?",
                                (prefix, prefix + "\U0010ffff")).fetchall()
            return {str(k): str(v) for k, v in rows if str(k).startswith(prefix)}

        return await self._read(run)

    async def set_meta(self, key: str, value: str) -> None:
        await self._write(lambda conn: conn.execute(
            "INSERT INTO meta(key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        ))


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
