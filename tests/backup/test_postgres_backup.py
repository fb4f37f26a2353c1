"""The `postgres` backend is backed up (pg_dump of one snapshot), verified and restored
(one transaction: old tables aside, dump, key-package purge) against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import tarfile
import threading
import time
from pathlib import Path

import psycopg
import pytest

from qpq_server.secrets import read_env_file
from tests.backup.support import db_key_of, ops, populate
from tests.helpers.postgres import PostgresCluster, pg_cluster
from tests.helpers.server import start_server
from tests.server.conftest import client_factory_for
from tests.server.test_postgres_nodes import PASSWORD, make_node_a

__all__ = ["pg_cluster"]

pytestmark = pytest.mark.slow


def _tables(dsn: str, schema: str = "public") -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))}


def _dsn(config: Path) -> str:
    return read_env_file(config.parent / ".env")["QPQ_DATABASE_URL"]


async def _receive(config: Path, profiles: Path) -> list[str]:
    srv = start_server(config)
    try:
        async with client_factory_for(srv, profiles)() as c:
            await c.login("bob", "pw-bob")
            return [m.text for m in await c.receive("bob")]
    finally:
        srv.stop()


def test_postgres_round_trip_purges_key_packages_and_serves_messages(
        tmp_path: Path, pg_cluster: PostgresCluster) -> None:
    source = make_node_a(tmp_path / "src", pg_cluster.new_database())
    asyncio.run(populate(source, tmp_path / "p"))
    created = ops("backup", "create", "--config", source, "--dest", tmp_path / "b",
                  "--no-textfile", "--json")
    assert created.exit_code == 0, created.stderr
    assert PASSWORD not in created.stdout + created.stderr
    info = created.json()
    assert info["row_counts"]["accounts"] == 2 and info["row_counts"]["messages"] == 3
    assert info["row_counts"]["key_packages"] > 0
    archive = Path(info["archive"])
    with tarfile.open(archive) as tar:
        assert "db/qpq.pgdump" in tar.getnames()
    verified = ops("backup", "verify", archive, "--config", source, "--json")
    assert verified.exit_code == 0 and verified.json()["database_checked"], verified.stdout

    fresh = make_node_a(tmp_path / "fresh", pg_cluster.new_database())
    restored = ops("restore", archive, "--config", fresh, "--json",
                   env={"QPQ_DB_KEY": db_key_of(source)})
    assert restored.exit_code == 0, restored.stderr + restored.stdout
    report = restored.json()
    assert report["purged_key_packages"] == info["row_counts"]["key_packages"]
    assert report["aside_schema"] is None
    assert report["doctor"]["ok"], report["doctor"]
    with psycopg.connect(_dsn(fresh)) as conn:
        assert conn.execute("SELECT count(*) FROM key_packages").fetchone() == (0,)
        state = conn.execute("SELECT value FROM meta WHERE key = 'restore_state'").fetchone()
        assert state == ("done",)

    # The restored database now holds data: refused without --force.
    again = ops("restore", archive, "--config", fresh, env={"QPQ_DB_KEY": db_key_of(source)})
    assert again.exit_code == 64 and "not empty" in again.stderr, again.stderr

    assert asyncio.run(_receive(fresh, tmp_path / "p")) == [
        "message 0", "message 1", "message 2"]

    # With --force the previous tables move into a schema of their own, never dropped.
    forced = ops("restore", archive, "--config", fresh, "--force", "--json",
                 env={"QPQ_DB_KEY": db_key_of(source)})
    assert forced.exit_code == 0, forced.stderr + forced.stdout
    aside = forced.json()["aside_schema"]
    assert aside and aside.startswith("pre_restore_")
    assert {"accounts", "messages", "meta"} <= _tables(_dsn(fresh), aside)
    with psycopg.connect(_dsn(fresh)) as conn:  # bob's client already took them once
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (3,)
        assert conn.execute(f"SELECT count(*) FROM {aside}.messages").fetchone() == (0,)


def test_postgres_verify_detects_a_damaged_dump_and_restore_changes_nothing(
        tmp_path: Path, pg_cluster: PostgresCluster) -> None:
    source = make_node_a(tmp_path / "src", pg_cluster.new_database())
    asyncio.run(populate(source, tmp_path / "p", messages=1))
    created = ops("backup", "create", "--config", source, "--dest", tmp_path / "b",
                  "--no-textfile", "--json")
    assert created.exit_code == 0, created.stderr
    archive = Path(created.json()["archive"])
    data = bytearray(archive.read_bytes())
    start = data.find(b"PGDMP")  # the dump's header: flip bytes inside the dump
    assert start > 0
    data[start + 2000:start + 2010] = b"\x00" * 10
    damaged = tmp_path / "damaged" / archive.name
    damaged.parent.mkdir()
    damaged.write_bytes(bytes(data))
    verified = ops("backup", "verify", damaged, "--config", source, "--json")
    assert verified.exit_code == 2, verified.stdout
    assert any("db/qpq.pgdump" in p for p in verified.json()["problems"])

    fresh = make_node_a(tmp_path / "fresh", pg_cluster.new_database())
    refused = ops("restore", damaged, "--config", fresh, env={"QPQ_DB_KEY": db_key_of(source)})
    assert refused.exit_code == 2, refused.stderr
    assert _tables(_dsn(fresh)) == set()


def test_postgres_restore_refuses_while_a_node_uses_the_database(
        tmp_path: Path, pg_cluster: PostgresCluster) -> None:
    source = make_node_a(tmp_path / "src", pg_cluster.new_database())
    asyncio.run(populate(source, tmp_path / "p", messages=1))
    created = ops("backup", "create", "--config", source, "--dest", tmp_path / "b",
                  "--no-textfile", "--json")
    archive = created.json()["archive"]
    srv = start_server(source)
    try:
        refused = ops("restore", archive, "--config", source, "--force",
                      env={"QPQ_DB_KEY": db_key_of(source)})
    finally:
        srv.stop()
    # the running server's pid file is seen first on this host; a node on another host
    # is seen through its connections to the database
    assert refused.exit_code == 64 and "running" in refused.stderr, refused.stderr
    with psycopg.connect(_dsn(source)):  # what a node on another host looks like
        other = ops("restore", archive, "--config", source, "--force",
                    env={"QPQ_DB_KEY": db_key_of(source)})
    assert other.exit_code == 64 and "other connections" in other.stderr, other.stderr


def test_postgres_backup_without_database_url_is_refused(
        tmp_path: Path, pg_cluster: PostgresCluster) -> None:
    source = make_node_a(tmp_path / "src", pg_cluster.new_database())
    env = read_env_file(source.parent / ".env")
    env.pop("QPQ_DATABASE_URL")
    (source.parent / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    refused = ops("backup", "create", "--config", source, "--dest", tmp_path / "b",
                  "--no-textfile")
    assert refused.exit_code != 0 and "QPQ_DATABASE_URL" in refused.stderr, refused.stderr


def test_postgres_backup_under_concurrent_writes_counts_exactly_what_it_dumped(
        tmp_path: Path, pg_cluster: PostgresCluster) -> None:
    """Rows committed while pg_dump runs are in neither the dump nor the counts: both
    come from one exported snapshot, so verify's row counts match."""
    source = make_node_a(tmp_path / "src", pg_cluster.new_database())
    asyncio.run(populate(source, tmp_path / "p", messages=1))
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        with psycopg.connect(_dsn(source), autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO messages(recipient, sender, payload, sent_at) "
                             "VALUES ('bob', 'alice', 'x', 0)")
                written[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while written[0] < 50:  # the writer is committing before the backup starts
            assert time.monotonic() < deadline
            time.sleep(0.01)
        created = ops("backup", "create", "--config", source, "--dest", tmp_path / "b",
                      "--no-textfile", "--json")
    finally:
        stop.set()
        thread.join(10)
    assert created.exit_code == 0, created.stderr
    counted = created.json()["row_counts"]["messages"]
    assert 50 < counted < 1 + written[0]
    verified = ops("backup", "verify", created.json()["archive"], "--config", source, "--json")
    assert verified.exit_code == 0, verified.stdout
