"""The `postgres` storage backend in backups and restores: pg_dump, pg_restore, psql.

- Backup: one REPEATABLE READ transaction exports its snapshot; the row counts and the
  schema version are read inside it and `pg_dump --snapshot` dumps exactly that snapshot
  (custom format, the `public` schema qpq's migrations create, without owners or grants
  so it restores under any role). Every commit acknowledged before `snapshot_at_unix` is
  in the dump.
- Restore: `pg_restore` turns the dump into SQL and `psql --single-transaction` runs, as
  one transaction, (a) the previous tables moved aside into a schema
  `pre_restore_<time>` (only with --force; never dropped), (b) the dump, (c) the
  key-package purge and `restore_state = done`. A crash anywhere leaves the database as
  it was before.
- Verify: `pg_restore` reads the whole dump (every compressed block) and the rows of each
  table are counted against the manifest.

The DSN's password never appears on a command line (it would show in `ps`): the tools get
the DSN without it and the password through PGPASSWORD in their environment.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpq_ops.errors import ArchiveDamaged, OpsError, Refused
from qpq_server.storage.base import RESTORE_STATE_KEY

__all__ = ["DUMP_MEMBER", "PgFacts", "PgSnapshot", "database_tables", "dump_counts",
           "dump_database", "other_sessions", "pg_facts", "pg_purge", "pg_restore_state",
           "restore_dump", "tool"]

DUMP_MEMBER = "db/qpq.pgdump"
SCHEMA = "public"  # where qpq's migrations create their tables (the DSN's search_path)
_TOOL_TIMEOUT_S = 6 * 3600
_COPY = re.compile(r"^COPY (?:public|\"public\")\.\"?(\w+)\"? \(.*\) FROM stdin;$")


@dataclass(frozen=True)
class PgSnapshot:
    path: Path
    schema_version: int
    row_counts: dict[str, int]
    snapshot_at_unix: float
    size: int


def tool(name: str) -> str:
    """The newest installed PostgreSQL client `name` (pg_dump must not be older than the
    server it dumps; Debian keeps each major version under /usr/lib/postgresql/N/bin)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                   key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    path = found[-1] if found else shutil.which(name)
    if not path:
        raise OpsError(f"{name} not found: install the PostgreSQL client tools "
                       "(Debian: apt install postgresql-client)")
    return path


def _split_dsn(dsn: str) -> tuple[str, dict[str, str]]:
    """(DSN without its password, environment carrying the password) for the tools."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        raise Refused("QPQ_DATABASE_URL is not a valid PostgreSQL connection string") from None
    password = params.pop("password", None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password:
        env["PGPASSWORD"] = str(password)
    env["PGCONNECT_TIMEOUT"] = "10"
    return make_conninfo(**{k: str(v) for k, v in params.items() if v is not None}), env


def _describe(exc: BaseException, dsn: str) -> str:
    # The backend module imports psycopg: only a postgres deployment pays for it, not
    # every backup/restore/rotate command of a SQLite one (issue 17).
    from qpq_server.storage.postgres import describe_pg_error

    return describe_pg_error(exc, dsn)


def _run(argv: list[str], dsn: str, what: str) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, check=False, capture_output=True, text=True,
                              timeout=_TOOL_TIMEOUT_S, env=_split_dsn(dsn)[1])
    except subprocess.TimeoutExpired:
        raise OpsError(f"{what} timed out") from None
    if done.returncode != 0:
        first = next((ln for ln in done.stderr.splitlines() if ln.strip()), "failed")
        raise OpsError(f"{what} failed: {_describe(RuntimeError(first), dsn)}")
    return done


@contextmanager
def _connect(dsn: str) -> Iterator[Any]:
    import psycopg

    try:
        # autocommit: transactions are the explicit BEGIN/COMMIT (or conn.transaction())
        # below, so BEGIN ISOLATION LEVEL ... really opens the snapshot's transaction
        conn = psycopg.connect(dsn, connect_timeout=10, autocommit=True)
    except psycopg.Error as exc:
        raise OpsError(f"cannot connect to the database (QPQ_DATABASE_URL): "
                       f"{_describe(exc, dsn)}") from None
    try:
        yield conn
    finally:
        conn.close()


def _tables(cur: Any) -> list[str]:
    cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY tablename",
                (SCHEMA,))
    return [str(r[0]) for r in cur.fetchall()]


def database_tables(dsn: str) -> list[str]:
    """The tables in qpq's schema: a database holding any is not empty."""
    with _connect(dsn) as conn:
        return _tables(conn.cursor())


def _functions(cur: Any) -> list[tuple[str, str]]:
    # qpq's own functions (the mailbox_usage trigger's), not an extension's: an
    # extension's functions move with the extension, never one by one.
    cur.execute("SELECT p.proname, pg_get_function_identity_arguments(p.oid)"
                " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = %s AND NOT EXISTS (SELECT 1 FROM pg_depend d"
                " WHERE d.objid = p.oid AND d.deptype = 'e') ORDER BY 1, 2", (SCHEMA,))
    return [(str(name), str(args)) for name, args in cur.fetchall()]


def database_functions(dsn: str) -> list[tuple[str, str]]:
    """qpq's functions in its schema (name, argument list): they move aside with the
    tables, or the dump's CREATE FUNCTION would find them in the way."""
    with _connect(dsn) as conn:
        return _functions(conn.cursor())


def other_sessions(dsn: str) -> int:
    """Other connections to the same database (a qpq node still running)."""
    with _connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                           "current_database() AND pid <> pg_backend_pid()").fetchone()
        return int(row[0])


def _counts(cur: Any) -> dict[str, int]:
    counts = {}
    for table in _tables(cur):
        if table == "schema_version":
            continue
        cur.execute(f'SELECT count(*) FROM "{SCHEMA}"."{table}"')  # noqa: S608 (catalog name)
        counts[table] = int(cur.fetchone()[0])
    return counts


def dump_database(dsn: str, dest: Path) -> PgSnapshot:
    """pg_dump of one exported snapshot, with the counts and version of that snapshot."""
    with _connect(dsn) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        level = conn.execute("SHOW transaction_isolation").fetchone()
        if level is None or level[0] != "repeatable read":
            raise OpsError("could not open a repeatable-read snapshot for the dump")
        # Taken before the snapshot: a commit acknowledged before now is in it.
        snapshot_at = time.time()
        cur = conn.cursor()
        cur.execute("SELECT pg_export_snapshot()")
        snapshot_id = str(cur.fetchone()[0])
        if "schema_version" not in _tables(cur):
            raise OpsError("the database holds no qpq schema (has the server ever run "
                           "against QPQ_DATABASE_URL?)")
        cur.execute("SELECT coalesce(max(version), 0) FROM schema_version")
        version = int(cur.fetchone()[0])
        counts = _counts(cur)
        conninfo = _split_dsn(dsn)[0]
        _run([tool("pg_dump"), "--format=custom", "--no-owner", "--no-privileges",
              f"--schema={SCHEMA}", f"--snapshot={snapshot_id}", f"--file={dest}",
              f"--dbname={conninfo}"], dsn, "pg_dump")
        conn.execute("COMMIT")
    return PgSnapshot(dest, version, counts, snapshot_at, dest.stat().st_size)


def dump_counts(dump: Path) -> dict[str, int]:
    """Rows per table in a custom-format dump, read to its end (proves it decompresses)."""
    argv = [tool("pg_restore"), "--data-only", "--file=-", str(dump)]
    counts: dict[str, int] = {}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, errors="replace") as proc:
        assert proc.stdout is not None and proc.stderr is not None
        table: str | None = None
        for line in proc.stdout:
            if table is None:
                match = _COPY.match(line.rstrip("\n"))
                if match:
                    table = match.group(1)
                    counts[table] = 0
            elif line == "\\.\n":
                table = None
            else:
                counts[table] += 1
        err = proc.stderr.read()
    if proc.returncode != 0:
        first = next((ln for ln in err.splitlines() if ln.strip()), "unreadable")
        raise ArchiveDamaged(f"the database dump does not read: {first}")
    counts.pop("schema_version", None)
    return counts


def _upsert(key: str, value: str) -> str:
    from psycopg import sql

    return sql.SQL("INSERT INTO public.meta(key, value) VALUES ({}, {}) ON CONFLICT (key) "
                   "DO UPDATE SET value = excluded.value;").format(
        sql.Literal(key), sql.Literal(value)).as_string(None)


def _move_aside_sql(tables: list[str], functions: list[tuple[str, str]],
                    aside_schema: str) -> str:
    from psycopg import sql

    schema = sql.Identifier(aside_schema)
    parts = [sql.SQL("CREATE SCHEMA {};").format(schema)]
    parts += [sql.SQL("ALTER TABLE {}.{} SET SCHEMA {};").format(
        sql.Identifier(SCHEMA), sql.Identifier(t), schema) for t in tables]
    # The argument list comes from pg_get_function_identity_arguments (type names
    # PostgreSQL itself printed), so it is SQL as written, not input from anyone.
    parts += [sql.SQL("ALTER FUNCTION {}.{}(" + args + ") SET SCHEMA {};").format(
        sql.Identifier(SCHEMA), sql.Identifier(name), schema) for name, args in functions]
    return " ".join(p.as_string(None) for p in parts)


def _purge_sql(archive_name: str) -> str:
    # Literals quoted by psycopg's sql.Literal (in _upsert): nothing is interpolated raw.
    return ("DELETE FROM public.key_packages; " + _upsert(RESTORE_STATE_KEY, "done")  # noqa: S608
            + _upsert("restored_from", archive_name)
            + _upsert("restored_at", f"{time.time():.3f}"))


def restore_dump(dsn: str, dump: Path, archive_name: str, aside_schema: str | None,
                 work_dir: Path) -> None:
    """Into the database, in one transaction: move the old tables aside (when
    `aside_schema`), load the dump, purge the one-time key packages."""
    script = work_dir / "restore.sql"
    _run([tool("pg_restore"), "--no-owner", "--no-privileges", f"--file={script}",
          str(dump)], dsn, "pg_restore")
    # pg_dump --schema=public writes `CREATE SCHEMA public`, which exists in every
    # database: the schema itself is not ours to restore, only what is in it.
    text = script.read_text()
    text = re.sub(r"(?m)^CREATE SCHEMA public;$", "", text)
    script.write_text(text)
    before = (_move_aside_sql(database_tables(dsn), database_functions(dsn), aside_schema)
              if aside_schema else "")
    argv = [tool("psql"), "--no-psqlrc", "--quiet", "--single-transaction",
            "--set=ON_ERROR_STOP=1"]
    if before:
        argv.append(f"--command={before}")
    argv += [f"--file={script}", f"--command={_purge_sql(archive_name)}",
             f"--dbname={_split_dsn(dsn)[0]}"]
    try:
        _run(argv, dsn, "psql (restoring the dump)")
    finally:
        script.unlink(missing_ok=True)


def pg_restore_state(dsn: str) -> str | None:
    with _connect(dsn) as conn:
        if "meta" not in _tables(conn.cursor()):
            return None
        row = conn.execute("SELECT value FROM meta WHERE key = %s",
                           (RESTORE_STATE_KEY,)).fetchone()
        return str(row[0]) if row else None


def pg_purge(dsn: str, archive_name: str = "") -> int:
    """Delete every one-time key package and record the purge as done, in one commit."""
    with _connect(dsn) as conn, conn.transaction():
        purged = conn.execute("DELETE FROM public.key_packages").rowcount
        conn.execute(_upsert(RESTORE_STATE_KEY, "done"))
        conn.execute(_upsert("restored_at", f"{time.time():.3f}"))
        if archive_name:
            conn.execute(_upsert("restored_from", archive_name))
    return int(purged)


@dataclass(frozen=True)
class PgFacts:
    """What the post-restore doctor checks in a postgres database."""
    server_version: str
    restore_state: str | None
    key_packages: int
    rows_read: int
    accounts_per_setup: dict[int, int]


def pg_facts(dsn: str) -> PgFacts:
    """Every row of every qpq table read in full (each row rendered as text, which reads
    every column and every TOASTed value), plus what the doctor's checks need."""
    with _connect(dsn) as conn:
        cur = conn.cursor()
        version = str(conn.execute("SHOW server_version").fetchone()[0])
        tables = _tables(cur)
        missing = {"accounts", "key_packages", "meta"} - set(tables)
        if missing:
            raise OpsError(f"the database holds no qpq schema (no {sorted(missing)[0]} table)")
        rows = 0
        for table in tables:
            cur.execute(f'SELECT count(*), coalesce(sum(length(t::text)), 0) '  # noqa: S608
                        f'FROM "{SCHEMA}"."{table}" t')
            rows += int(cur.fetchone()[0])
        cur.execute("SELECT count(*) FROM public.key_packages")
        left = int(cur.fetchone()[0])
        cur.execute("SELECT setup_version, count(*) FROM public.accounts GROUP BY 1")
        per_setup = {int(v): int(n) for v, n in cur.fetchall()}
        cur.execute("SELECT value FROM public.meta WHERE key = %s", (RESTORE_STATE_KEY,))
        row = cur.fetchone()
    return PgFacts(version, str(row[0]) if row else None, left, rows, per_setup)
