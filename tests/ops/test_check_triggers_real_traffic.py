"""check-triggers on a real server under real QUIC traffic (direct mode): rejected
hellos drive the login-failure rate, held connections drive connections-vs-cap."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from qpq_ops.cli import app
from qpq_server.client import ClientError
from qpq_server.devserver import RunningServer, running_server, wait_until

runner = CliRunner()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("traffic"),
                        overrides={"quic": {"max_connections": 10}}) as srv:
        yield srv


def direct(server: RunningServer, trigger: str, sample: float) -> dict:  # type: ignore[type-arg]
    result = runner.invoke(app, ["check-triggers", "--metrics-url", server.metrics_url,
                                 "--sample", str(sample), "--trigger", trigger, "--json"])
    doc = json.loads(result.stdout)
    doc["exit_code"] = result.exit_code
    return doc


async def _bad_hellos(server: RunningServer, stop: threading.Event, failed: list[int]) -> None:
    """Two paced attackers, each one bad hello per 0.3 s at most, until `stop`: the rate is
    steady for as long as the sample runs, wherever its window falls (at most 400/min,
    about 120/min even if each refused handshake takes a whole second)."""
    async def attacker() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                async with server.connect("wrong-token", timeout=5):
                    pass
            except ClientError:
                failed.append(1)
            await asyncio.sleep(max(0.0, 0.3 - (time.monotonic() - started)))

    await asyncio.gather(attacker(), attacker())


def test_rejected_hellos_raise_login_failures_per_minute(server: RunningServer) -> None:
    stop = threading.Event()
    failed: list[int] = []
    before = server.metric("qpq_auth_login_failure_total")
    thread = threading.Thread(target=lambda: asyncio.run(_bad_hellos(server, stop, failed)))
    thread.start()
    try:
        wait_until(lambda: server.metric("qpq_auth_login_failure_total") > before, 30,
                   "the first rejected hello being counted")
        doc = direct(server, "login_failures", sample=3)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert failed and server.metric("qpq_auth_login_failure_total") >= before + len(failed)
    row = doc["triggers"][0]
    # ~2 x 200 per minute at most: past the 50/min warning, under the 500/min critical
    assert 50 < row["value"] < 500, row
    assert row["state"] == "warning" and doc["exit_code"] == 1


def test_held_connections_near_the_cap_are_reported(server: RunningServer) -> None:
    opened = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    async def hold(n: int) -> None:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(n):
                await stack.enter_async_context(server.connect(timeout=5))
            opened.set()
            while not release.is_set():
                await asyncio.sleep(0.05)

    def run() -> None:
        try:
            asyncio.run(hold(9))
        except BaseException as exc:  # reported by the test below
            errors.append(exc)
            opened.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert opened.wait(30) and not errors, errors
        doc = direct(server, "connections", sample=0.2)
    finally:
        release.set()
        thread.join(timeout=30)
    row = doc["triggers"][0]
    assert row["value"] == pytest.approx(90.0)  # 9 of the configured cap of 10
    assert row["state"] == "warning" and doc["exit_code"] == 1


def test_idle_server_connections_are_ok(server: RunningServer) -> None:
    def idle() -> dict | None:  # type: ignore[type-arg]
        doc = direct(server, "connections", sample=0.1)
        return doc if doc["triggers"][0]["value"] == 0 else None

    # closed connections linger 3 x PTO after the previous test
    doc = wait_until(idle, 10, "no open connections")
    assert doc["triggers"][0]["state"] == "ok" and doc["exit_code"] == 0
