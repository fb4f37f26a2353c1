"""Measure qpq's own costs on this host: `qpq-ops capacity calibrate`.

Starts a throwaway `qpq-server` on loopback (its own temporary data dir, rate limits
off), drives it with the client library and reads the server process's CPU time and
resident memory from /proc between phases:

1. idle: RSS of the fresh process, then of it holding `idle_connections` connections;
2. handshakes: connect and close, one after another;
3. logins: OPAQUE logins of one registered user;
4. enqueue, then fetch, then ack, each alone in a loop;
5. commits: concurrent enqueues; `qpq_db_write_duration_seconds_count` over the time.

Client and server share this host's cores, so the CPU figures include no client work
but compete with it: they are upper bounds. Linux only (/proc).
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpq_ops.calibration import Calibration
from qpq_ops.errors import CalibrationRunError

if TYPE_CHECKING:
    from qpq_server.devserver import RunningServer

__all__ = ["calibrate", "machine_description", "throwaway_server"]

_PHASES = 6
"""handshakes, logins, enqueue, fetch, ack, commits share the time budget equally"""


# What calibration changes on the throwaway server: measure costs, not the limits that
# protect a production server from floods.
_CALIBRATION_OVERRIDES: dict[str, dict[str, Any]] = {
    "rate_limit": {"enabled": False},
    "quic": {"max_handshakes_in_flight": 4096, "retry": "never",
             "max_unauthenticated_per_address": 4096},
}


@contextmanager
def throwaway_server(workdir: Path, timeout: float = 60.0) -> Iterator[RunningServer]:
    """The project's one throwaway-server launcher (`qpq_server.devserver`), with its
    start-up failures turned into one-line calibration errors."""
    from qpq_server.devserver import init_server_dir, start_server

    try:
        config_path = init_server_dir(workdir / "data", _CALIBRATION_OVERRIDES)
        server = start_server(config_path, ready_timeout=timeout)
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise CalibrationRunError(f"cannot start the throwaway qpq-server: {first_line}"
                                  f" (log: {workdir / 'data' / 'server.log'})") from None
    try:
        yield server
    finally:
        server.stop()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_bytes(pid: int) -> int:
    from qpq_server.devserver import rss_kb

    return rss_kb(pid) * 1024


def machine_description() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count() or 0),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


async def _timed(server: RunningServer, seconds: float,
                 step: Callable[[], Any]) -> float:
    """Server CPU seconds per call of `step`, looping it for `seconds` (at least 5)."""
    calls = 0
    started_cpu, deadline = _cpu_s(server.process.pid), time.monotonic() + seconds
    while calls < 5 or time.monotonic() < deadline:
        await step()
        calls += 1
    return (_cpu_s(server.process.pid) - started_cpu) / calls


async def _measure(server: RunningServer, seconds: float, idle_connections: int,
                   workdir: Path, progress: Callable[[str], None]) -> Calibration:
    from qpq_server.client import QpqClient

    def open_one() -> Any:
        return server.connect(timeout=30, idle_timeout=300)

    share = seconds / _PHASES
    async with AsyncExitStack() as stack:
        progress("idle connections")
        await asyncio.sleep(0.5)
        base = _rss_bytes(server.process.pid)
        conns = [await stack.enter_async_context(open_one())
                 for _ in range(idle_connections)]
        await asyncio.sleep(1.0)
        per_conn = max(1, (_rss_bytes(server.process.pid) - base) // max(1, len(conns)))

        progress("handshakes")

        async def handshake() -> None:
            async with open_one():
                pass

        cpu_handshake = await _timed(server, share, handshake)

        progress("OPAQUE logins")
        client = QpqClient(conns[0], workdir / "profiles")
        await client.register("calibrate", "calibrate-password")

        async def login() -> None:
            await client.login("calibrate", "calibrate-password")

        cpu_login = await _timed(server, share, login)
        session = client.profile("calibrate").session
        conn = conns[0]
        payload = b"x" * 200

        progress("enqueue, fetch, ack")
        ids: list[int] = []

        async def enqueue() -> None:
            await conn.call("enqueue", session=session, recipients=["calibrate"],
                            payload=payload)

        cpu_enqueue = await _timed(server, share, enqueue)

        async def fetch() -> None:
            got = await conn.call("fetch", session=session, limit=1)
            ids.extend(m["id"] for m in got["messages"])

        cpu_fetch = await _timed(server, share, fetch)
        for _ in range(len(ids) // 2 + 5):
            await enqueue()

        async def ack() -> None:
            got = await conn.call("fetch", session=session, limit=1)
            if got["messages"]:
                await conn.call("ack", session=session, ids=[got["messages"][0]["id"]])

        cpu_fetch_ack = await _timed(server, share, ack)
        cpu_ack = max(cpu_fetch_ack - cpu_fetch, cpu_fetch_ack / 10)

        progress("durable commits")
        commits_before = server.metric("qpq_db_write_duration_seconds_count")
        started, deadline = time.monotonic(), time.monotonic() + share

        async def writer(index: int) -> None:
            mine = conns[index % len(conns)]
            while time.monotonic() < deadline:
                await mine.call("enqueue", session=session, recipients=["calibrate"],
                                payload=payload)

        await asyncio.gather(*(writer(i) for i in range(min(16, len(conns)))))
        commits = server.metric("qpq_db_write_duration_seconds_count")
        commits_per_s = max(1.0, (commits - commits_before) / (time.monotonic() - started))

    return Calibration(
        rss_base_bytes=base, rss_per_connection_bytes=int(per_conn),
        cpu_s_per_enqueue=_positive(cpu_enqueue), cpu_s_per_fetch=_positive(cpu_fetch),
        cpu_s_per_ack=_positive(cpu_ack), cpu_s_per_handshake=_positive(cpu_handshake),
        cpu_s_per_login=_positive(cpu_login), durable_commits_per_s=round(commits_per_s, 1),
        machine={**machine_description(), "seconds": f"{seconds:g}",
                 "idle_connections": str(idle_connections)},
    )


def _positive(value: float) -> float:
    """A CPU figure rounded to 0.1 µs, never 0 (a clock tick is 10 ms)."""
    return max(round(value, 7), 1e-7)


def calibrate(seconds: float = 20.0, idle_connections: int = 200,
              progress: Callable[[str], None] = lambda _phase: None) -> Calibration:
    """Run the whole calibration (about `seconds` plus start-up) and return it."""
    if sys.platform != "linux":
        raise CalibrationRunError("calibrate reads /proc: it runs on Linux only")
    with tempfile.TemporaryDirectory(prefix="qpq-calibrate-") as tmp:
        workdir = Path(tmp)
        with throwaway_server(workdir) as server:
            try:
                return asyncio.run(_measure(server, seconds, idle_connections, workdir,
                                            progress))
            except (OSError, TimeoutError) as exc:
                raise CalibrationRunError(f"load against the throwaway server failed: "
                                          f"{type(exc).__name__}: {exc}") from None
