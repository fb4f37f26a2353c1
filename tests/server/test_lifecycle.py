"""Server lifecycle: restart, SIGTERM under traffic, bad start-up, SIGHUP reload, limits."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from qpq_server.client import ClientError
from qpq_server.devserver import (
    BIN,
    await_until,
    free_port,
    init_server_dir,
    running_server,
    start_server,
)
from qpq_server.secrets import read_env_file, write_env_file
from tests.server.conftest import client_factory_for


async def test_messages_survive_a_restart(tmp_path: Path) -> None:
    config = init_server_dir(tmp_path / "d")
    srv = start_server(config)
    try:
        make = client_factory_for(srv, tmp_path / "p")
        async with make() as c:
            await c.register("rs_a", "pw")
            await c.register("rs_b", "pw")
            await c.send_text("rs_a", ["rs_b"], "before restart")
    finally:
        assert srv.stop() == 0
    srv = start_server(config)
    try:
        async with client_factory_for(srv, tmp_path / "p")() as c:
            got = await c.receive("rs_b")
            assert [m.text for m in got] == ["before restart"]
    finally:
        srv.stop()


async def test_sigterm_under_traffic_loses_no_acknowledged_message(tmp_path: Path) -> None:
    config = init_server_dir(tmp_path / "d", {"rate_limit": {"enabled": False}})
    srv = start_server(config)
    acked: list[int] = []
    make = client_factory_for(srv, tmp_path / "p")
    async with make() as c:
        await c.register("st_a", "pw")
        await c.register("st_b", "pw")
        session = c.profile("st_a").session

    async def sender() -> None:
        async with srv.connect(timeout=5) as conn:
            for i in range(2000):
                try:
                    response = await conn.call("enqueue", session=session,
                                               recipients=["st_b"], payload=b"m%d" % i)
                except ClientError:
                    return  # server went away: anything unacknowledged may be lost
                acked.extend(response["ids"])

    tasks = [asyncio.create_task(sender()) for _ in range(4)]
    await await_until(lambda: len(acked) >= 100, 30, "100 acknowledged enqueues")
    srv.signal(signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert srv.process.wait(timeout=20) == 0
    assert "draining" in srv.log() and "Traceback" not in srv.log()

    srv = start_server(config)
    try:
        async with client_factory_for(srv, tmp_path / "p")() as c:
            await c.login("st_b", "pw")
            stored: set[int] = set()
            while True:
                batch = await c.conn.call("fetch", session=c.profile("st_b").session, limit=500)
                if not batch["messages"]:
                    break
                ids = [m["id"] for m in batch["messages"]]
                stored.update(ids)
                await c.conn.call("ack", session=c.profile("st_b").session, ids=ids)
        missing = set(acked) - stored
        assert not missing, f"{len(missing)} acknowledged messages lost"
        assert len(acked) >= 100
    finally:
        srv.stop()


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "qpq-server"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def clean_env(**extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("QPQ_")}
    env.update(extra)
    return env


def test_wrong_db_key_at_startup_fails_with_one_clear_line(tmp_path: Path) -> None:
    config = init_server_dir(tmp_path / "d")
    srv = start_server(config)  # create the database with the right key
    srv.stop()
    result = run_cli("run", "--config", str(config), env=clean_env(QPQ_DB_KEY="ab" * 32))
    assert result.returncode != 0
    assert "QPQ_DB_KEY does not open" in result.stderr
    assert "Traceback" not in result.stderr
    assert ("ab" * 32) not in result.stderr


def test_missing_db_key_fails_cleanly(tmp_path: Path) -> None:
    config = init_server_dir(tmp_path / "d")
    env_file = config.parent / ".env"
    values = read_env_file(env_file)
    del values["QPQ_DB_KEY"]
    write_env_file(env_file, values)
    result = run_cli("run", "--config", str(config), env=clean_env())
    assert result.returncode != 0 and "QPQ_DB_KEY is not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_fails_cleanly(tmp_path: Path) -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    try:
        config = init_server_dir(tmp_path / "d", {"server": {"listen": f"127.0.0.1:{port}"}})
        result = run_cli("run", "--config", str(config), env=clean_env())
    finally:
        blocker.close()
    assert result.returncode != 0 and "cannot listen on UDP" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_certificate_fails_cleanly(tmp_path: Path) -> None:
    config = init_server_dir(tmp_path / "d")
    (config.parent / "tls" / "cert.pem").write_text("not a certificate")
    result = run_cli("run", "--config", str(config), env=clean_env())
    assert result.returncode != 0 and "certificate" in result.stderr.lower()
    assert "Traceback" not in result.stderr


def test_init_refuses_to_overwrite_secrets(tmp_path: Path) -> None:
    assert run_cli("init", "--data-dir", str(tmp_path / "d")).returncode == 0
    before = (tmp_path / "d" / ".env").read_text()
    result = run_cli("init", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 1 and "refusing to overwrite" in result.stderr
    assert (tmp_path / "d" / ".env").read_text() == before
    assert (tmp_path / "d" / ".env").stat().st_mode & 0o777 == 0o600


def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    run_cli("init", "--data-dir", str(tmp_path / "d"))
    config = tmp_path / "d" / "qpq-server.toml"
    assert run_cli("check-config", str(config)).returncode == 0
    config.write_text(
        '[server]\nlisten = "nowhere"\ntls_cert = "missing.pem"\nbogus = 1\n'
        '[quic]\nmax_connections = "many"\nidle_timeout_s = -5\nretry = "sometimes"\n'
        '[storage]\npool_size = 0\n[mystery]\nx = 1\n')
    result = run_cli("check-config", str(config))
    assert result.returncode == 1
    for fragment in ("listen", "missing.pem", "unknown key 'bogus'", "max_connections must be int",
                     "idle_timeout_s must be > 0", "retry must be one of", "pool_size must be > 0",
                     "unknown section [mystery]"):
        assert fragment in result.stderr, fragment
    config.write_text("this is [not toml")
    result = run_cli("check-config", str(config))
    assert result.returncode == 1 and "not valid TOML" in result.stderr
    result = run_cli("check-config", str(tmp_path / "absent.toml"))
    assert result.returncode == 1 and "not found" in result.stderr


async def test_sighup_rotates_tokens_without_dropping_connections(tmp_path: Path) -> None:
    config = init_server_dir(tmp_path / "d")
    srv = start_server(config)
    try:
        old = srv.auth_token
        async with srv.connect(old) as live:
            env_file = config.parent / ".env"
            values = read_env_file(env_file)
            values.update(QPQ_AUTH_TOKEN="brand-new-token", QPQ_AUTH_TOKEN_PREVIOUS=old)
            write_env_file(env_file, values)
            srv.reload()
            assert (await live.call("ping"))["ok"]  # established connection survives
            for token in ("brand-new-token", old):  # both accepted during the grace window
                async with srv.connect(token):
                    pass
            del values["QPQ_AUTH_TOKEN_PREVIOUS"]
            write_env_file(env_file, values)
            srv.reload()
            with pytest.raises(ClientError):
                async with srv.connect(old):
                    pass
            # The old token is revoked now: the connection that used it is closed too.
            await await_until(lambda: live.protocol.terminated is not None, 15,
                              "the connection on the revoked token being closed")
            assert "revoked" in live.protocol.terminated
        assert "reloaded" in srv.log() and "brand-new-token" not in srv.log()
    finally:
        srv.stop()


async def test_connection_cap_refuses_with_a_clear_reason(tmp_path: Path) -> None:
    with running_server(tmp_path, overrides={"quic": {"max_connections": 2}}) as srv:
        async with srv.connect(), srv.connect():
            with pytest.raises(ClientError) as err:
                async with srv.connect(timeout=5):
                    pass
            assert "connection cap" in err.value.message
        text = httpx.get(srv.metrics_url + "/metrics").text
        assert 'qpq_connections_refused_total{reason="cap"} 1.0' in text


async def test_rate_limit_trips_and_is_counted(tmp_path: Path) -> None:
    overrides = {"rate_limit": {"address_rate_per_s": 5.0, "address_burst": 10}}
    with running_server(tmp_path, overrides=overrides) as srv:
        async with srv.connect() as conn:
            codes = []
            for _ in range(30):
                response = await conn.call_raw({"op": "ping"})
                codes.append("ok" if response["ok"] else response["error"]["code"])
        assert "rate_limited" in codes and codes[0] == "ok"
        assert srv.metric("qpq_rate_limit_hit_total", scope="address") >= 15


async def test_expired_session_is_refused(tmp_path: Path) -> None:
    with running_server(tmp_path, overrides={"server": {"session_ttl_s": 1}}) as srv:
        async with client_factory_for(srv, tmp_path / "p")() as c:
            await c.register("exp_u", "pw")
            session = c.profile("exp_u").session

            async def refused() -> dict[str, Any] | None:
                response = await c.conn.call_raw({"op": "fetch", "session": session})
                return None if response["ok"] else response

            response = await await_until(refused, 10, "the 1 s session expiring")
            assert response["error"]["code"] == "invalid_session"
            assert "expired" in response["error"]["message"]


def test_client_cli_round_trip(tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        env = clean_env(QPQ_AUTH_TOKEN=srv.auth_token, QPQ_PASSWORD="pw")
        base = [str(BIN / "qpq-client"), "--server", srv.address, "--ca", str(srv.ca_cert),
                "--server-name", "localhost", "--profile", str(tmp_path / "prof")]

        def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run(base + list(args), capture_output=True, text=True, env=env,
                                  input=stdin, timeout=30)

        assert cli("register", "cli_a").returncode == 0
        assert cli("register", "cli_b").returncode == 0
        assert cli("send", "cli_a", "cli_b", "hi there").returncode == 0
        assert cli("send", "cli_a", "cli_b", stdin="from stdin").returncode == 0
        out = cli("recv", "cli_b", "--json")
        assert out.returncode == 0
        import json

        lines = [json.loads(ln) for ln in out.stdout.splitlines()]
        assert [(m["from"], m["text"]) for m in lines] == [("cli_a", "hi there"),
                                                           ("cli_a", "from stdin")]
        assert all(isinstance(m["sent_at"], float) for m in lines)
        keyfile = tmp_path / "prof" / "cli_a.keys"
        assert keyfile.stat().st_mode & 0o777 == 0o600
        bad = subprocess.run([*base, "login", "cli_a"], capture_output=True, text=True,
                             env={**env, "QPQ_PASSWORD": "nope"}, timeout=30)
        assert bad.returncode == 1 and "login_failed" in bad.stderr
        no_token = subprocess.run([*base, "recv", "cli_a"], capture_output=True, text=True,
                                  env=clean_env(), timeout=30)
        assert no_token.returncode == 64 and "QPQ_AUTH_TOKEN" in no_token.stderr
        unreachable = subprocess.run(
            [str(BIN / "qpq-client"), "--server", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
             "--ca", str(srv.ca_cert), "--timeout", "1", "--profile", str(tmp_path / "prof"),
             "recv", "cli_a"], capture_output=True, text=True, env=env, timeout=30)
        assert unreachable.returncode == 1 and "unreachable" in unreachable.stderr
        assert "Traceback" not in unreachable.stderr




async def test_accounts_survive_an_opaque_setup_rotation(tmp_path: Path) -> None:
    from qpq_server.auth.opaque import create_setup

    config = init_server_dir(tmp_path / "d")
    srv = start_server(config)
    try:
        async with client_factory_for(srv, tmp_path / "p")() as c:
            await c.register("rot_u", "pw")
    finally:
        srv.stop()
    create_setup(config.parent / "opaque", version=2)  # what `qpq-ops rotate opaque` does
    srv = start_server(config)
    try:
        async with client_factory_for(srv, tmp_path / "p")() as c:
            await c.login("rot_u", "pw")  # old record still logs in, then moves to v2
            with pytest.raises(ClientError):
                await c.login("rot_u", "wrong")
        assert "account moved to the current OPAQUE setup" in srv.log()
    finally:
        srv.stop()
    (config.parent / "opaque" / "setup-v1.bin").unlink()  # old setup retired
    (config.parent / "opaque" / "dummy-v1.bin").unlink()
    srv = start_server(config)
    try:
        async with client_factory_for(srv, tmp_path / "p")() as c:
            await c.login("rot_u", "pw")
    finally:
        srv.stop()


def test_postgres_backend_needs_a_usable_database_url(tmp_path: Path) -> None:
    # connect_timeout_s: how long `run` waits for the closed port below (default 5 s)
    config = init_server_dir(tmp_path / "d", {"storage": {"backend": "postgres",
                                                          "connect_timeout_s": 1.0}})
    checked = run_cli("check-config", str(config), env=clean_env())
    assert checked.returncode == 1 and "needs QPQ_DATABASE_URL" in checked.stderr
    result = run_cli("run", "--config", str(config), env=clean_env())
    assert result.returncode == 1 and "needs QPQ_DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr
    # A malformed DSN is named as such, never echoed (it may hold a password).
    bad = clean_env(QPQ_DATABASE_URL="this is not a dsn s3cret")
    checked = run_cli("check-config", str(config), env=bad)
    assert checked.returncode == 1 and "not a valid PostgreSQL connection string" in (
        checked.stderr)
    assert "s3cret" not in checked.stderr
    # A database nobody answers: one clear line, no password, no traceback.
    away = clean_env(QPQ_DATABASE_URL=f"postgresql://qpq:s3cret@127.0.0.1:{free_port()}/qpq")
    assert run_cli("check-config", str(config), env=away).returncode == 0
    result = run_cli("run", "--config", str(config), env=away)
    assert result.returncode == 1 and "PostgreSQL (QPQ_DATABASE_URL)" in result.stderr
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr


