"""Two real `qpq-server` processes (two nodes of one cluster) on one real PostgreSQL.

Node B is made with `qpq-server init --join A`, so it shares A's secrets (access token,
OPAQUE setup, session key, KT signing key) and has its own TLS certificate.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pytest
import tomli_w

from qpq_server.client import ClientError, QpqClient, connect
from qpq_server.secrets import read_env_file, write_env_file
from tests.helpers.ports import free_port
from tests.helpers.postgres import PostgresCluster, pg_cluster, postgres_cluster
from tests.helpers.server import BIN, RunningServer, init_data_dir, start_server
from tests.server.test_workers import one_per_worker

__all__ = ["pg_cluster"]

pytestmark = pytest.mark.slow
PASSWORD = "s3cret-db-pw"


def make_node_a(directory: Path, dsn: str) -> Path:
    config = init_data_dir(directory, {"storage": {"backend": "postgres", "connect_timeout_s": 2},
                                       "rate_limit": {"enabled": False}})
    env = read_env_file(directory / ".env")
    # trust auth ignores the password: it is here to prove it never reaches a log line
    dsn = dsn.replace("qpq@", f"qpq:{PASSWORD}@", 1)
    write_env_file(directory / ".env", {**env, "QPQ_DATABASE_URL": dsn})
    return config


def join_node(directory: Path, existing: Path) -> Path:
    done = subprocess.run([str(BIN / "qpq-server"), "init", "--data-dir", str(directory),
                           "--join", str(existing)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    config_path = directory / "qpq-server.toml"
    config = tomllib.loads(config_path.read_text())
    # Same host in the test: the copied ports would clash.
    config["server"]["listen"] = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    config["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
    config_path.write_text(tomli_w.dumps(config))
    return config_path


@contextmanager
def two_nodes(tmp_path: Path, dsn: str) -> Iterator[tuple[RunningServer, RunningServer]]:
    a_config = make_node_a(tmp_path / "a", dsn)
    b_config = join_node(tmp_path / "b", tmp_path / "a")
    a = start_server(a_config)
    try:
        b = start_server(b_config)
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


@asynccontextmanager
async def client_of(srv: RunningServer, profiles: Path) -> AsyncIterator[QpqClient]:
    async with connect(srv.address, srv.auth_token, ca=srv.ca_cert, server_name="localhost",
                       timeout=15) as conn:
        yield QpqClient(conn, profiles)


def ready(srv: RunningServer) -> bool:
    try:
        return httpx.get(srv.metrics_url + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.1)


async def wake_across(qa: QpqClient, qb: QpqClient, b: RunningServer, text: str) -> float:
    """Park a long-poll for bob on B, enqueue through A; return the wake-up latency."""
    waiter = asyncio.create_task(qb.receive("bob", wait_s=30))
    await until(lambda: b.metric("qpq_delivery_waiters") >= 1, "bob's fetch is parked on B")
    started = time.monotonic()
    await qa.send_text("alice", ["bob"], text)
    got = await asyncio.wait_for(waiter, 20)
    assert [m.text for m in got] == [text]
    return time.monotonic() - started


async def test_nodes_share_accounts_sessions_and_wake_each_others_long_polls(
        tmp_path: Path, pg_cluster: PostgresCluster) -> None:
    profiles = tmp_path / "profiles"
    with two_nodes(tmp_path, pg_cluster.new_database()) as (a, b):
        assert read_env_file(b.data_dir / ".env") == read_env_file(a.data_dir / ".env")
        assert b.ca_cert.read_bytes() != a.ca_cert.read_bytes()  # its own certificate
        async with client_of(a, profiles) as qa, client_of(b, profiles) as qb:
            await qa.register("alice", "pw-a")
            await qa.register("bob", "pw-b")
            await qb.login("bob", "pw-b")  # registered on A, logged in on B
            latency = await wake_across(qa, qb, b, "across nodes")
            assert latency < 2.0, f"cross-node wake-up took {latency:.2f}s"
            # alice's session was minted by A; B accepts it (one session key). The
            # profile keys sessions by the address it was given, so hand A's session to
            # B's address, as one name in front of both nodes would.
            alice = qa.profile("alice")
            alice.servers[qb.server] = alice.servers[qa.server]
            alice.save()
            await qb.send_text("alice", ["bob"], "sent through B")
            assert [m.text for m in await qa.receive("bob")] == ["sent through B"]
            # One key-transparency log: B's view has A's appends.
            assert (await qb.kt.lookup("alice")).username == "alice"
        assert PASSWORD not in a.log() + b.log()


async def test_database_outage_mid_traffic_loses_nothing_acknowledged(
        tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    acked: list[str] = []
    with postgres_cluster() as cluster, two_nodes(tmp_path, cluster.new_database()) as (a, b):
        async with client_of(a, profiles) as qa, client_of(b, profiles) as qb:
            await qa.register("alice", "pw-a")
            await qa.register("bob", "pw-b")
            await qb.login("bob", "pw-b")

            async def send(text: str) -> None:
                await qa.send_text("alice", ["bob"], text)
                acked.append(text)

            for i in range(5):
                await send(f"before {i}")
            cluster.stop("fast")
            refused = 0
            for i in range(3):
                try:
                    await send(f"during {i}")
                except ClientError as exc:
                    assert exc.code == "server_busy", exc
                    assert "database is unavailable" in exc.message
                    assert "127.0.0.1" not in exc.message  # the DB's address stays inside
                    refused += 1
            assert refused >= 1
            await until(lambda: not ready(a) and not ready(b), "/readyz fails on both nodes")
            cluster.start()
            restarted = time.monotonic()
            await until(lambda: ready(a) and ready(b), "/readyz passes again", timeout=60)
            print(f"ready again {time.monotonic() - restarted:.1f}s after the restart")
            for i in range(5):
                await send(f"after {i}")
            received: list[str] = []
            while batch := await qb.receive("bob"):
                received += [m.text for m in batch]
            missing = [t for t in acked if t not in received]
            assert not missing, f"acknowledged but lost: {missing}"
            # The LISTEN connections came back too: a wake-up still crosses nodes.
            latency = await wake_across(qa, qb, b, "after the outage")
            assert latency < 2.0, f"cross-node wake-up took {latency:.2f}s after the outage"
    assert "storage unavailable" in a.log() and "storage available again" in a.log()
    assert PASSWORD not in a.log() + b.log()


async def test_worker_processes_on_postgres_wake_each_other_and_report_outages(
        tmp_path: Path) -> None:
    with postgres_cluster() as cluster:
        config = make_node_a(tmp_path / "w", cluster.new_database())
        text = tomllib.loads(config.read_text())
        text["server"]["workers"] = 2
        config.write_text(tomli_w.dumps(text))
        srv = start_server(config)
        try:
            async with one_per_worker(srv) as conns:
                a = QpqClient(conns[0], tmp_path / "a")
                b = QpqClient(conns[1], tmp_path / "b")
                await a.register("wk_alice", "pw")
                await b.register("wk_bob", "pw")
                parked = asyncio.ensure_future(conns[1].call(
                    "fetch", timeout=30, session=b.profile("wk_bob").session, wait_s=20.0))
                await until(lambda: srv.metric("qpq_delivery_waiters") == 1, "bob parks")
                started = time.monotonic()
                await a.conn.call("enqueue", session=a.profile("wk_alice").session,
                                  recipients=["wk_bob"], payload=b"across workers")
                answer = await asyncio.wait_for(parked, 15)
                assert [m["payload"] for m in answer["messages"]] == [b"across workers"]
                assert time.monotonic() - started < 2.0
            cluster.stop("fast")
            await until(lambda: not ready(srv), "the supervisor's /readyz fails")
            cluster.start()
            await until(lambda: ready(srv), "/readyz passes again", timeout=60)
        finally:
            srv.stop()
    assert PASSWORD not in srv.log()
