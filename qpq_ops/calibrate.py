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
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from qpq_ops.calibration import Calibration
from qpq_ops.errors import CalibrationRunError

__all__ = ["ThrowawayServer", "calibrate", "machine_description", "throwaway_server"]

_PHASES = 6
"""handshakes, logins, enqueue, fetch, ack, commits share the time budget equally"""


@dataclass(frozen=True)
class ThrowawayServer:
    pid: int
    address: str
    auth_token: str
    ca_cert: Path
    metrics_url: str


def _free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


@contextmanager
def throwaway_server(workdir: Path, timeout: float = 60.0) -> Iterator[ThrowawayServer]:
    """`qpq-server init` + `run` on free loopback ports; stopped (TERM, then KILL) after."""
    import tomli_w

    from qpq_server.secrets import read_env_file

    data_dir = workdir / "data"
    init = subprocess.run([_bin("qpq-server"), "init", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if init.returncode != 0:
        raise CalibrationRunError(f"qpq-server init failed: {init.stderr.strip()[:200]}")
    config_path = data_dir / "qpq-server.toml"
    config: dict[str, Any] = tomllib.loads(config_path.read_text())
    quic, metrics = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_STREAM)
    config["server"]["listen"] = f"127.0.0.1:{quic}"
    config.setdefault("metrics", {})["listen"] = f"127.0.0.1:{metrics}"
    # measure costs, not the limits that protect a production server from floods
    config.setdefault("rate_limit", {})["enabled"] = False
    config.setdefault("quic", {}).update({"max_handshakes_in_flight": 4096, "retry": "never"})
    config_path.write_text(tomli_w.dumps(config))
    env = {**os.environ, **read_env_file(data_dir / ".env")}
    log = (workdir / "server.log").open("wb")
    process = subprocess.Popen([_bin("qpq-server"), "run", "--config", str(config_path)],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    metrics_url = f"http://127.0.0.1:{metrics}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise CalibrationRunError(f"qpq-server exited with {process.returncode} "
                                          f"(log: {workdir / 'server.log'})")
            try:
                if httpx.get(f"{metrics_url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise CalibrationRunError(f"qpq-server not ready within {timeout:g} s")
            time.sleep(0.1)
        yield ThrowawayServer(process.pid, f"127.0.0.1:{quic}", env["QPQ_AUTH_TOKEN"],
                              data_dir / "tls" / "cert.pem", metrics_url)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        log.close()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise CalibrationRunError(f"no VmRSS for pid {pid}")


def _metric(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == name)


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


async def _timed(server: ThrowawayServer, seconds: float,
                 step: Callable[[], Any]) -> float:
    """Server CPU seconds per call of `step`, looping it for `seconds` (at least 5)."""
    calls = 0
    started_cpu, deadline = _cpu_s(server.pid), time.monotonic() + seconds
    while calls < 5 or time.monotonic() < deadline:
        await step()
        calls += 1
    return (_cpu_s(server.pid) - started_cpu) / calls


async def _measure(server: ThrowawayServer, seconds: float, idle_connections: int,
                   workdir: Path, progress: Callable[[str], None]) -> Calibration:
    from qpq_server.client import QpqClient, connect

    def open_one() -> Any:
        return connect(server.address, server.auth_token, ca=server.ca_cert,
                       server_name="localhost", timeout=30, idle_timeout=300)

    share = seconds / _PHASES
    async with AsyncExitStack() as stack:
        progress("idle connections")
        await asyncio.sleep(0.5)
        base = _rss_bytes(server.pid)
        conns = [await stack.enter_async_context(open_one())
                 for _ in range(idle_connections)]
        await asyncio.sleep(1.0)
        per_conn = max(1, (_rss_bytes(server.pid) - base) // max(1, len(conns)))

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
        commits_before = _metric(server.metrics_url, "qpq_db_write_duration_seconds_count")
        started, deadline = time.monotonic(), time.monotonic() + share

        async def writer(index: int) -> None:
            mine = conns[index % len(conns)]
            while time.monotonic() < deadline:
                await mine.call("enqueue", session=session, recipients=["calibrate"],
                                payload=payload)

        await asyncio.gather(*(writer(i) for i in range(min(16, len(conns)))))
        commits = _metric(server.metrics_url, "qpq_db_write_duration_seconds_count")
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
