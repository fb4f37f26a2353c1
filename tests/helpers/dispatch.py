"""The dispatch core in process: a real Service on a real SQLCipher file, no sockets.

Shared by tests/server/test_dispatch.py and the property/fault tests under tests/fuzz
and tests/faults: `harness()` yields a `Harness` whose `call` goes straight to
`Dispatcher.handle`. `wrap_storage` lets a fault test put a wrapper around the real
storage (the Service then sees only the wrapper).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import opaque_ke_py as opaque

from qpq_server.config import Config, load_config
from qpq_server.core import ServerCore, build_core
from qpq_server.datadir import init_data_dir
from qpq_server.metrics import ServerMetrics
from qpq_server.protocol.dispatch import ConnectionState, Dispatcher, Request, Response
from qpq_server.secrets import load_secrets
from qpq_server.storage import open_storage
from qpq_server.storage.base import Storage

PASSWORD = b"correct horse battery staple"


class Clock:
    """A clock the test moves (session expiry, rate-limit refill)."""

    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Harness:
    core: ServerCore
    metrics: ServerMetrics
    clock: Clock
    token: str
    db_key: str = ""

    @property
    def dispatcher(self) -> Dispatcher:
        return self.core.dispatcher

    async def call(self, conn: ConnectionState, op: Any, **fields: Any) -> Response:
        request: Request = {"op": op, **fields}
        return await self.dispatcher.handle(request, conn)

    async def connect(self, peer: str = "127.0.0.1") -> ConnectionState:
        conn = ConnectionState(peer=peer)
        assert (await self.call(conn, "hello", token=self.token))["ok"]
        return conn

    async def register(self, conn: ConnectionState, user: str,
                       password: bytes = PASSWORD) -> None:
        start = opaque.client_registration_start(password)
        r = await self.call(conn, "register_start", username=user, request=start.get_message())
        finish = opaque.client_registration_finish(password, start.get_state(), r["response"])
        assert (await self.call(conn, "register_finish", username=user,
                                upload=finish.get_message()))["ok"]

    async def login(self, conn: ConnectionState, user: str,
                    password: bytes = PASSWORD, **extra: Any) -> Response:
        start = opaque.client_login_start(password)
        r = await self.call(conn, "login_start", username=user, request=start.get_message())
        if not r["ok"]:
            return r
        try:
            finish = opaque.client_login_finish(password, start.get_state(), r["response"])
        except ValueError:
            return await self.call(conn, "login_finish", login_id=r["login_id"],
                                   finalization=b"")
        return await self.call(conn, "login_finish", login_id=r["login_id"],
                               finalization=finish.get_message(), **extra)

    async def passwd(self, conn: ConnectionState, user: str, session: str,
                     new_password: bytes) -> Response:
        """passwd_start/finish on `conn` (which must have logged in as `user` just now)."""
        start = opaque.client_registration_start(new_password)
        r = await self.call(conn, "passwd_start", session=session, request=start.get_message())
        if not r["ok"]:
            return r
        finish = opaque.client_registration_finish(new_password, start.get_state(),
                                                   r["response"])
        return await self.call(conn, "passwd_finish", session=session,
                               upload=finish.get_message())

    async def session(self, conn: ConnectionState, user: str) -> str:
        await self.register(conn, user)
        result = await self.login(conn, user)
        assert result["ok"], result
        return str(result["session"])

    def errors(self, op: str, code: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "qpq_rpc_errors_total", {"op": op, "code": code})
        return value or 0.0


def config_with(data_dir: Path, **sections: Any) -> Config:
    """The config `init` wrote into data_dir, with some sections' fields replaced."""
    config = load_config(data_dir / "qpq-server.toml")
    changes = {name: dataclasses.replace(getattr(config, name), **values)
               for name, values in sections.items()}
    return dataclasses.replace(config, **changes)


async def harness(tmp_path: Path, wrap_storage: Callable[[Storage], Storage] | None = None,
                  **sections: Any) -> AsyncIterator[Harness]:
    """A fresh data dir under tmp_path and a core on it; storage closed afterwards."""
    data_dir = tmp_path / "data"
    init_data_dir(data_dir)
    config = config_with(data_dir, **sections)
    secrets = load_secrets(data_dir / ".env")
    metrics = ServerMetrics()
    storage = open_storage(config, secrets.db_key)
    await storage.open()
    served = wrap_storage(storage) if wrap_storage else storage
    clock = Clock()
    try:
        core = await build_core(config, secrets, served, metrics, clock=clock)
        yield Harness(core, metrics, clock, secrets.auth_tokens[0].reveal(),
                      secrets.db_key.reveal())
    finally:
        await storage.close()


def code(response: Response) -> str:
    assert response["ok"] is False, response
    return str(response["error"]["code"])
