"""The storage contract suite runs against every backend: same inputs, same behaviour."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from qpq_server.secrets import Secret
from qpq_server.storage.base import Storage
from qpq_server.storage.filestore import FileStorage
from qpq_server.storage.postgres import PostgresStorage
from qpq_server.storage.sqlcipher import SqlCipherStorage
from tests.helpers.postgres import PostgresCluster, pg_cluster

__all__ = ["pg_cluster"]  # the session's PostgreSQL, started only when a test asks

BACKENDS = ("sqlcipher", "file", "postgres")
StorageFactory = Callable[[], Storage]


def make_factory(backend: str, directory: Path, dsn: str = "") -> StorageFactory:
    def make() -> Storage:
        if backend == "sqlcipher":
            return SqlCipherStorage(directory / "qpq.db", Secret("ab" * 32), pool_size=3)
        if backend == "postgres":
            return PostgresStorage(Secret(dsn), pool_size=3)
        return FileStorage(directory / "store", pool_size=3)

    return make


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def storage_factory(backend: str, tmp_path: Path,
                    request: pytest.FixtureRequest) -> StorageFactory:
    """Makes unopened storages on one directory or database (to test reopening)."""
    dsn = ""
    if backend == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
        dsn = cluster.new_database()
    return make_factory(backend, tmp_path, dsn)


@pytest.fixture
async def storage(storage_factory: StorageFactory) -> AsyncIterator[Storage]:
    s = storage_factory()
    await s.open()
    try:
        yield s
    finally:
        await s.close()
