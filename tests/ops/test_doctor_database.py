"""`qpq-ops doctor`'s database check against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg

from qpq_ops.deployment import load_deployment
from qpq_ops.doctor import CheckState, DoctorInputs
from qpq_ops.doctor.checks import check_database
from qpq_server.secrets import Secret, read_env_file, write_env_file
from qpq_server.storage.postgres import PostgresStorage
from tests.helpers.ports import free_port
from tests.helpers.postgres import PostgresCluster, pg_cluster
from tests.helpers.server import init_data_dir

__all__ = ["pg_cluster"]


def doctor_inputs(tmp_path: Path, backend: str, dsn: str | None) -> DoctorInputs:
    config = init_data_dir(tmp_path / "d", {"storage": {"backend": backend}})
    if dsn is not None:
        env = read_env_file(config.parent / ".env")
        write_env_file(config.parent / ".env", {**env, "QPQ_DATABASE_URL": dsn})
    return DoctorInputs(config_path=config, deployment=load_deployment(config),
                        prometheus_url=None, plan=None, textfile_dir=tmp_path,
                        now=time.time(), timeout=2.0)


async def _migrate(dsn: str) -> None:
    storage = PostgresStorage(Secret(dsn))
    await storage.open()  # applies the migrations
    await storage.close()


def test_skipped_on_other_backends(tmp_path: Path) -> None:
    result = check_database(doctor_inputs(tmp_path, "sqlcipher", None))
    assert result.state is CheckState.SKIPPED and "sqlcipher" in result.detail


def test_missing_url_is_critical(tmp_path: Path) -> None:
    result = check_database(doctor_inputs(tmp_path, "postgres", None))
    assert result.state is CheckState.CRITICAL and "QPQ_DATABASE_URL" in result.detail


def test_unreachable_database_is_critical_without_the_password(tmp_path: Path) -> None:
    dsn = f"postgresql://qpq:pw-s3cret@127.0.0.1:{free_port()}/qpq"
    result = check_database(doctor_inputs(tmp_path, "postgres", dsn))
    assert result.state is CheckState.CRITICAL and result.detail.startswith("cannot connect")
    assert "pw-s3cret" not in result.detail + result.fix and "\n" not in result.detail


def test_reports_version_and_schema(tmp_path: Path, pg_cluster: PostgresCluster) -> None:
    dsn = pg_cluster.new_database()
    fresh = check_database(doctor_inputs(tmp_path / "fresh", "postgres", dsn))
    assert fresh.state is CheckState.WARNING and "schema 0" in fresh.detail
    asyncio.run(_migrate(dsn))
    ok = check_database(doctor_inputs(tmp_path / "ok", "postgres", dsn))
    assert ok.state is CheckState.OK and ok.detail.startswith("PostgreSQL ")
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO schema_version(version) VALUES (99)")
    newer = check_database(doctor_inputs(tmp_path / "newer", "postgres", dsn))
    assert newer.state is CheckState.CRITICAL and "newer than this qpq" in newer.detail
