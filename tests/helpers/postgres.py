"""A real, throw-away PostgreSQL for tests: the launcher is `qpq_server.devpostgres`
(shared with bench/), the session fixture is here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qpq_server.devpostgres import USER, PostgresCluster, pg_bindir, postgres_cluster

__all__ = ["USER", "PostgresCluster", "pg_bindir", "pg_cluster", "postgres_cluster"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One PostgreSQL per test session (per xdist worker); import into a conftest."""
    with postgres_cluster() as cluster:
        yield cluster
