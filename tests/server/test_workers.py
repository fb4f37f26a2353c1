"""`[server] workers = 2`: two worker processes on one SO_REUSEPORT port under a
supervisor, real processes on loopback (issue 14)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest

from qpq_server.client import QpqClient, QpqConnection
from qpq_server.devserver import (
    BIN,
    RunningServer,
    await_until,
    init_server_dir,
    running_server,
)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    overrides = {"server": {"workers": 2},
                 "rate_limit": {"address_burst": 400, "address_rate_per_s": 200.0,
                                "account_burst": 400, "account_rate_per_s": 200.0}}
    with running_server(tmp_path_factory.mktemp("workers"), overrides=overrides) as server:
        yield server



@asynccontextmanager
async def one_per_worker(srv: RunningServer) -> AsyncIterator[dict[int, QpqConnection]]:
    """Connections from new source ports until each worker holds one."""
    found: dict[int, QpqConnection] = {}
    async with AsyncExitStack() as stack:
        for _ in range(40):
            conn = await stack.enter_async_context(srv.connect(hello=False))
            worker = (await conn.call("hello", token=srv.auth_token))["worker"]
            found.setdefault(worker, conn)
            if len(found) == 2:
                yield found
                return
        raise AssertionError(f"40 connections all landed on workers {sorted(found)}")


def worker_pids(srv: RunningServer) -> dict[str, float]:
    text = httpx.get(srv.metrics_url + "/metrics", timeout=5).text
    starts = {}
    for line in text.splitlines():
        if line.startswith("process_start_time_seconds{worker="):
            name = line.split('"')[1]
            starts[name] = float(line.rsplit(" ", 1)[1])
    return starts


async def test_both_workers_serve_and_a_long_poll_on_one_wakes_for_the_other(
        srv: RunningServer, tmp_path: Path) -> None:
    async with one_per_worker(srv) as conns:
        a, b = QpqClient(conns[0], tmp_path / "a"), QpqClient(conns[1], tmp_path / "b")
        await a.register("wk_alice", "pw")
        await b.register("wk_bob", "pw")
        bob = b.profile("wk_bob").session
        parked = asyncio.ensure_future(conns[1].call("fetch", timeout=30, session=bob,
                                                     wait_s=20.0))
        await await_until(lambda: srv.metric("qpq_delivery_waiters") == 1, 10, "bob to park")
        started = time.monotonic()
        await a.conn.call("enqueue", session=a.profile("wk_alice").session,
                          recipients=["wk_bob"], payload=b"across workers")
        answer = await asyncio.wait_for(parked, 15)
        assert [m["payload"] for m in answer["messages"]] == [b"across workers"]
        assert time.monotonic() - started < 5  # woken, not timed out
        # One /metrics for the host: enqueues through both workers are summed.
        before = srv.metric("qpq_enqueue_total")
        await b.conn.call("enqueue", session=bob, recipients=["wk_alice"], payload=b"back")
        await await_until(lambda: srv.metric("qpq_enqueue_total") == before + 1, 10,
                     "the second worker's enqueue in /metrics")
    assert set(worker_pids(srv)) >= {"0", "1", "supervisor"}


async def test_a_killed_worker_is_restarted_and_nothing_acknowledged_is_lost(
        srv: RunningServer, tmp_path: Path) -> None:
    async with srv.connect() as conn:
        c = QpqClient(conn, tmp_path)
        await c.register("kw_alice", "pw")
        await c.register("kw_bob", "pw")
        session = c.profile("kw_alice").session
        ids = [(await conn.call("enqueue", session=session, recipients=["kw_bob"],
                                payload=f"m{i}".encode()))["ids"][0] for i in range(5)]
    children = subprocess.run(["pgrep", "-P", str(srv.process.pid)], capture_output=True,
                              text=True, check=True).stdout.split()
    victim = int(children[0])
    before = worker_pids(srv)
    os.kill(victim, signal.SIGKILL)
    def restarted() -> bool:  # a new worker with a new start time, and the host ready again
        now_pids = worker_pids(srv)
        ready = httpx.get(srv.metrics_url + "/readyz", timeout=5).status_code == 200
        return ready and len(now_pids) == 3 and now_pids != before

    await await_until(restarted, 30, "the killed worker being restarted")
    assert srv.process.poll() is None
    async with srv.connect() as conn:
        c = QpqClient(conn, tmp_path)  # the same device, after the restart
        await c.login("kw_bob", "pw")
        got = await conn.call("fetch", session=c.profile("kw_bob").session)
        assert [m["id"] for m in got["messages"]] == ids


async def test_address_rate_limit_holds_host_wide(tmp_path: Path) -> None:
    overrides = {"server": {"workers": 2},
                 "rate_limit": {"address_burst": 60, "address_rate_per_s": 0.01}}
    with running_server(tmp_path, overrides=overrides) as server:
        async with one_per_worker(server) as conns:
            allowed = 0
            for _ in range(60):  # alternate workers: each holds half the host's budget
                for conn in conns.values():
                    response = await conn.call_raw({"op": "ping"})
                    if response["ok"]:
                        allowed += 1
                    else:
                        assert response["error"]["code"] == "rate_limited"
            # The host's 60 (less what the hellos spent), never 2 x 60 = all 120.
            assert 20 <= allowed <= 60
            assert server.metric("qpq_rate_limit_hit_total", scope="address") >= 60


def test_a_worker_that_cannot_start_stops_the_supervisor_with_exit_1(tmp_path: Path) -> None:
    config = init_server_dir(tmp_path / "d", overrides={"server": {"workers": 2}})
    import tomllib

    listen = tomllib.loads(config.read_text())["server"]["listen"]
    host, port = listen.rsplit(":", 1)
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind((host, int(port)))  # no SO_REUSEPORT: the workers cannot join it
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QPQ_")}
        result = subprocess.run([str(BIN / "qpq-server"), "run", "--config", str(config)],
                                capture_output=True, text=True, timeout=60, env=env)
    finally:
        blocker.close()
    assert result.returncode == 1
    assert "cannot listen on UDP" in result.stderr
    assert "worker failed to start" in result.stderr


async def test_sigterm_drains_every_worker_and_exits_0(tmp_path: Path) -> None:
    with running_server(tmp_path, overrides={"server": {"workers": 2}}) as server:
        async with one_per_worker(server) as conns:
            clients = {w: QpqClient(c, tmp_path / str(w)) for w, c in conns.items()}
            parked = []
            for worker, c in clients.items():
                await c.register(f"dr_{worker}", "pw")
                parked.append(asyncio.ensure_future(c.conn.call(
                    "fetch", timeout=30, session=c.profile(f"dr_{worker}").session,
                    wait_s=25.0)))
            await await_until(lambda: server.metric("qpq_delivery_waiters") == 2, 10,
                         "a fetch parked on each worker")
            server.signal(signal.SIGTERM)
            answers = await asyncio.wait_for(asyncio.gather(*parked), 20)
            assert all(a["ok"] and a["messages"] == [] for a in answers)
        assert server.process.wait(timeout=30) == 0
