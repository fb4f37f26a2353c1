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
from qpq_server.client import ClientError, connect
from tests.helpers.server import RunningServer, running_server

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


async def _bad_hellos(server: RunningServer, count: int) -> int:
    failed = 0
    for _ in range(count):
        try:
            async with connect(server.address, "wrong-token", ca=server.ca_cert, timeout=5):
                pass
        except ClientError:
            failed += 1
    return failed


def test_rejected_hellos_raise_login_failures_per_minute(server: RunningServer) -> None:
    results: dict[str, int] = {}

    def attack() -> None:
        time.sleep(0.5)  # inside the sample window
        results["failed"] = asyncio.run(_bad_hellos(server, 12))

    thread = threading.Thread(target=attack)
    thread.start()
    doc = direct(server, "login_failures", sample=4)
    thread.join(timeout=30)
    assert results["failed"] == 12
    row = doc["triggers"][0]
    # 12 failures in ~4 s = ~180 per minute: past the 50/min warning, under 500/min
    assert 50 < row["value"] < 500, row
    assert row["state"] == "warning" and doc["exit_code"] == 1


def test_held_connections_near_the_cap_are_reported(server: RunningServer) -> None:
    opened = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    async def hold(n: int) -> None:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(n):
                await stack.enter_async_context(
                    connect(server.address, server.auth_token, ca=server.ca_cert, timeout=5))
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
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        doc = direct(server, "connections", sample=0.1)
        if doc["triggers"][0]["value"] == 0:
            break
        time.sleep(0.3)  # closed connections linger 3 x PTO
    assert doc["triggers"][0]["state"] == "ok" and doc["exit_code"] == 0
