"""Fixtures: a real qpq-server subprocess on loopback, and real QUIC clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from qpq_server.client import QpqClient, QpqConnection
from qpq_server.devserver import RunningServer, running_server

ClientFactory = Callable[..., AbstractAsyncContextManager[QpqClient]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("srv"),
                        overrides={"rate_limit": {"enabled": False}}) as srv:
        yield srv


def client_factory_for(srv: RunningServer, profile_dir: Path) -> ClientFactory:
    @asynccontextmanager
    async def make(token: str | None = None) -> AsyncIterator[QpqClient]:
        async with srv.connect(token or None) as conn:
            yield QpqClient(conn, profile_dir)

    return make


@pytest.fixture
def client(server: RunningServer, tmp_path: Path) -> ClientFactory:
    return client_factory_for(server, tmp_path / "profiles")


@asynccontextmanager
async def raw_connection(srv: RunningServer, token: str | None = None,
                         hello: bool = True) -> AsyncIterator[QpqConnection]:
    async with srv.connect(token or None, hello=hello) as conn:
        yield conn
