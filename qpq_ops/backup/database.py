"""SQLCipher access for backup, verify and restore: open with a key, snapshot, count, check.

Everything goes through `qpq_server.storage.sqlcipher` (`connect_sqlcipher`,
`key_pragma`) so qpq-ops keys the database exactly as the server does.
"""

from __future__ import annotations

import errno
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpq_ops.errors import OpsError, WrongKey
from qpq_server.errors import WrongDatabaseKey
from qpq_server.secrets import Secret
from qpq_server.storage.sqlcipher import connect_sqlcipher, key_pragma

__all__ = ["IntegrityReport", "Snapshot", "check_integrity", "open_db", "row_counts",
           "schema_version", "snapshot_database"]

Connection = Any  # sqlcipher3 ships no type stubs
ProgressFn = Callable[[int], None]

_PAGES_PER_STEP = 2048


@functools.cache
def _quiet_sqlcipher() -> None:
    """SQLCipher logs every failed page decryption to stderr; our one-line error suffices."""
    import sqlcipher3

    sqlcipher3.connect(":memory:").execute("PRAGMA cipher_log_level = NONE")


def open_db(path: Path, db_key: Secret) -> Connection:
    """Open and key `path`; raise WrongKey (never echoing the key) if it does not open."""
    _quiet_sqlcipher()
    if not path.is_file():
        raise OpsError(f"database not found: {path}")
    try:
        return connect_sqlcipher(path, db_key)
    except WrongDatabaseKey:
        raise WrongKey(f"the database key does not open {path} "
                       "(wrong QPQ_DB_KEY, or not a qpq database)") from None


def schema_version(conn: Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def row_counts(conn: Connection) -> dict[str, int]:
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " ORDER BY name")]
    return {t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0])  # noqa: S608
            for t in tables}


@dataclass(frozen=True)
class Snapshot:
    path: Path
    schema_version: int
    row_counts: dict[str, int]
    snapshot_at_unix: float
    size: int


def snapshot_database(source: Path, dest: Path, db_key: Secret,
                      progress: ProgressFn | None = None) -> Snapshot:
    """Online, consistent copy of a live WAL database through SQLite's backup API.

    A read transaction is opened first and held for the whole copy: WAL readers see one
    fixed snapshot while the server keeps committing, so the copy never restarts and the
    row counts taken inside the same transaction describe exactly what was copied. Every
    commit acknowledged before `snapshot_at_unix` is in the copy. The copy is keyed with
    the same key, so it stays encrypted.
    """
    src = open_db(source, db_key)
    dst = None
    try:
        src.execute("BEGIN")
        # Taken before the first read starts the transaction: a commit acknowledged
        # before this instant finished before our snapshot did, so the copy holds it.
        snapshot_at = time.time()
        version = schema_version(src)  # first read: the snapshot is fixed from here
        counts = row_counts(src)
        page_size = int(src.execute("PRAGMA page_size").fetchone()[0])
        import sqlcipher3

        dst = sqlcipher3.connect(str(dest), isolation_level=None)
        dst.execute(key_pragma(db_key))
        done = [0]

        def step(_status: int, remaining: int, total: int) -> None:
            copied = (total - remaining) * page_size
            if progress is not None:
                progress(copied - done[0])
            done[0] = copied

        try:
            src.backup(dst, pages=_PAGES_PER_STEP, progress=step)
        except sqlcipher3.Error as exc:  # a full disk surfaces here as SQLITE_FULL/IOERR
            code = errno.ENOSPC if "full" in str(exc) else errno.EIO
            raise OSError(code, f"writing the database snapshot: {exc}") from None
        src.execute("COMMIT")
    finally:
        if dst is not None:
            dst.close()
        src.close()
    return Snapshot(dest, version, counts, snapshot_at, dest.stat().st_size)


@dataclass(frozen=True)
class IntegrityReport:
    cipher_problems: tuple[str, ...]
    integrity: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.cipher_problems and self.integrity == ("ok",)


def check_integrity(conn: Connection, full: bool = True) -> IntegrityReport:
    """`PRAGMA cipher_integrity_check` (page HMACs) and, if `full`, `integrity_check`."""
    try:
        cipher = tuple(str(r[0]) for r in conn.execute("PRAGMA cipher_integrity_check"))
        integrity = tuple(str(r[0]) for r in conn.execute("PRAGMA integrity_check")) \
            if full else ("ok",)
    except Exception as exc:  # sqlcipher3.DatabaseError on a damaged file
        return IntegrityReport((f"integrity check failed: {exc}",), ())
    return IntegrityReport(cipher, integrity)
