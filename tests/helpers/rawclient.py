"""OPAQUE register/login over a real QUIC connection, without the client library's
profile and E2E layers (fault and load tests send opaque bytes and check them back)."""

from __future__ import annotations

import opaque_ke_py as opaque

from qpq_server.client import QpqConnection
from qpq_server.client.errors import ClientError

PASSWORD = b"fault-harness password"


async def register(conn: QpqConnection, user: str, password: bytes = PASSWORD) -> None:
    """Register `user`; an existing account (from a retried attempt) is fine."""
    start = opaque.client_registration_start(password)
    r = await conn.call("register_start", username=user, request=start.get_message())
    finish = opaque.client_registration_finish(password, start.get_state(), r["response"])
    try:
        await conn.call("register_finish", username=user, upload=finish.get_message())
    except ClientError as exc:
        if exc.code != "user_exists":
            raise


async def login(conn: QpqConnection, user: str, password: bytes = PASSWORD) -> str:
    start = opaque.client_login_start(password)
    r = await conn.call("login_start", username=user, request=start.get_message())
    finish = opaque.client_login_finish(password, start.get_state(), r["response"])
    done = await conn.call("login_finish", login_id=r["login_id"],
                           finalization=finish.get_message())
    return str(done["session"])


async def session(conn: QpqConnection, user: str, password: bytes = PASSWORD) -> str:
    await register(conn, user, password)
    return await login(conn, user, password)
