"""Attacks on accounts and sessions (issue 11), against a real server on loopback:
a stolen session cannot change the password, sessions are revocable, password guessing
backs off without locking the real user out, and a new session key ends every session."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import opaque_ke_py as opaque
import pytest

from qpq_server.client import ClientError, QpqClient
from qpq_server.datadir import session_key_path
from qpq_server.devserver import BIN, RunningServer, await_until, running_server


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("accounts"), overrides={
            "rate_limit": {"enabled": False, "login_backoff_base_s": 60.0}}) as server:
        yield server


@asynccontextmanager
async def client(srv: RunningServer, profiles: Path,
                 local_host: str | None = None) -> AsyncIterator[QpqClient]:
    async with srv.connect(timeout=20, local_host=local_host) as conn:
        yield QpqClient(conn, profiles)


async def test_a_stolen_session_alone_cannot_change_the_password(
        srv: RunningServer, tmp_path: Path) -> None:
    async with client(srv, tmp_path / "victim") as victim:
        await victim.register("st_alice", "right password")
        stolen = victim.profile("st_alice").session
    async with client(srv, tmp_path / "thief") as thief:  # a new connection: no proof
        start = opaque.client_registration_start(b"thief's password")
        for op in ("passwd_start", "reregister_start"):
            with pytest.raises(ClientError) as refused:
                await thief.conn.call(op, session=stolen, request=start.get_message())
            assert refused.value.code in ("unauthenticated", "bad_request")
    async with client(srv, tmp_path / "victim") as again:  # her device
        await again.login("st_alice", "right password")  # still her password


async def test_reregistration_needs_a_pending_setup_move(srv: RunningServer,
                                                         tmp_path: Path) -> None:
    async with client(srv, tmp_path) as c:
        await c.register("rr_bob", "pw")  # register logs in: a fresh proof exists
        start = opaque.client_registration_start(b"other")
        with pytest.raises(ClientError) as refused:
            await c.conn.call("reregister_start", session=c.profile("rr_bob").session,
                              request=start.get_message())
        assert refused.value.code == "bad_request" and "no OPAQUE setup move" in \
            refused.value.message


async def test_a_password_change_revokes_the_other_sessions(srv: RunningServer,
                                                            tmp_path: Path) -> None:
    # Two connections of one device (one profile): sessions, not devices, are the point.
    async with client(srv, tmp_path / "p") as phone, client(srv, tmp_path / "p") as laptop:
        await phone.register("pw_carol", "old password")
        await laptop.login("pw_carol", "old password")
        old_laptop_session = laptop.profile("pw_carol").session
        await phone.change_password("pw_carol", "old password", "new password")
        assert (await phone.conn.call("fetch", session=phone.profile("pw_carol").session))
        with pytest.raises(ClientError) as revoked:
            await laptop.conn.call("fetch", session=old_laptop_session)
        assert revoked.value.code == "invalid_session" and "revoked" in revoked.value.message
        with pytest.raises(ClientError):
            await laptop.login("pw_carol", "old password")
        await laptop.login("pw_carol", "new password")


async def test_logout_revokes_every_session_of_the_account(srv: RunningServer,
                                                           tmp_path: Path) -> None:
    async with client(srv, tmp_path / "p") as a, client(srv, tmp_path / "p") as b:
        await a.register("lo_dave", "pw")
        await b.login("lo_dave", "pw")
        other = b.profile("lo_dave").session
        await a.logout("lo_dave")
        assert a.profile("lo_dave").session is None
        with pytest.raises(ClientError) as revoked:
            await b.conn.call("fetch", session=other)
        assert revoked.value.code == "invalid_session"


async def test_guessing_backs_off_but_the_real_user_elsewhere_still_logs_in(
        srv: RunningServer, tmp_path: Path) -> None:
    async with client(srv, tmp_path / "owner") as owner:
        await owner.register("bo_erin", "the real password")
    codes = []
    async with client(srv, tmp_path / "guesser") as guesser:  # from 127.0.0.1
        # each refused guess would sit through the client's ~5 s of rate_limited retries
        # (the 60 s backoff outlasts them); the last call below still goes through them
        retries, guesser.conn.rate_limit_retries = guesser.conn.rate_limit_retries, 0
        for i in range(8):
            try:
                await guesser.login("bo_erin", f"guess {i}")
            except ClientError as exc:
                codes.append(exc.code)
        assert codes[:5] == ["login_failed"] * 5 and "rate_limited" in codes[5:]
        guesser.conn.rate_limit_retries = retries
        with pytest.raises(ClientError) as blocked:  # even the right password, from here
            await guesser.login("bo_erin", "the real password")
        assert blocked.value.code == "rate_limited" and "retry in" in blocked.value.message
    started = time.monotonic()
    async with client(srv, tmp_path / "owner", local_host="127.0.0.2") as real:
        await real.login("bo_erin", "the real password")
    assert time.monotonic() - started < 10  # not slowed down by the guesser


def test_rotating_the_session_key_ends_every_session(tmp_path: Path) -> None:
    import asyncio

    with running_server(tmp_path) as server:
        async def login() -> tuple[str, QpqClient | None]:
            async with client(server, tmp_path / "p") as c:
                await c.register("sk_frank", "pw")
                session = c.profile("sk_frank").session
                assert session
                return session, None

        session, _ = asyncio.run(login())
        result = subprocess.run(
            [str(BIN / "qpq-ops"), "rotate", "session-key", "--config",
             str(server.config_path), "--json"],
            capture_output=True, text=True, timeout=60, env=os.environ.copy())
        assert result.returncode == 0, result.stderr
        key = session_key_path(server.data_dir)
        assert key.exists() and key.read_bytes().hex() not in result.stdout + result.stderr

        async def old_session_refused() -> None:
            async with client(server, tmp_path / "p") as c:  # the same device
                async def refused() -> bool:
                    try:
                        await c.conn.call("fetch", session=session)
                    except ClientError as exc:
                        assert exc.code == "invalid_session"
                        return True
                    return False

                await await_until(refused, 15, "the old session being refused")
                await c.login("sk_frank", "pw")

        asyncio.run(old_session_refused())
