"""The storage contract suite runs against every backend: same inputs, same behaviour."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from qpq_server.secrets import Secret
from qpq_server.storage.base import Storage
from qpq_server.storage.filestore import FileStorage
from qpq_server.storage.sqlcipher import SqlCipherStorage

BACKENDS = ("sqlcipher", "file")
StorageFactory = Callable[[], Storage]


def make_factory(backend: str, directory: Path) -> StorageFactory:
    def make() -> Storage:
        if backend == "sqlcipher":
            return SqlCipherStorage(directory / "qpq.db", Secret("ab" * 32), pool_size=3)
        return FileStorage(directory / "store", pool_size=3)

    return make


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def storage_factory(backend: str, tmp_path: Path) -> StorageFactory:
    """Makes unopened storages on one directory (to test reopening)."""
    return make_factory(backend, tmp_path)


@pytest.fixture
async def storage(storage_factory: StorageFactory) -> AsyncIterator[Storage]:
    s = storage_factory()
    await s.open()
    try:
        yield s
    finally:
        await s.close()
