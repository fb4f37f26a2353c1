"""`make demo`: a real qpq server on loopback, two users, real traffic, live metrics.

Initialises a throwaway data dir, starts `qpq-server run` (SQLCipher storage), registers
alice and bob, sends a batch of end-to-end-encrypted messages both ways, receives them,
prints the server's live `qpq_*` metrics, runs `qpq-ops check-triggers` on them, and
stops the server. Ctrl-C at any point stops the server and removes the data dir.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from qpq_server.client import ClientError, QpqClient
from qpq_server.devserver import (
    BIN,
    NODE_EXPORTER,
    NodeExporter,
    RunningServer,
    running_server,
    start_node_exporter,
)

console = Console()
MESSAGES_EACH_WAY = 25


async def traffic(srv: RunningServer, profiles: Path) -> None:
    async with srv.connect() as conn:
        client = QpqClient(conn, profiles)
        for user in ("alice", "bob"):
            await client.register(user, f"demo password of {user}")
            console.print(f"  registered [bold]{user}[/] (OPAQUE: the server never saw "
                          "the password)")
        started = time.perf_counter()
        for i in range(MESSAGES_EACH_WAY):
            await client.send_text("alice", ["bob"], f"hello bob #{i}")
            await client.send_text("bob", ["alice"], f"hi alice #{i}")
        sent = time.perf_counter() - started
        console.print(f"  sent {2 * MESSAGES_EACH_WAY} end-to-end-encrypted messages "
                      f"in {sent:.2f} s")
        for user in ("bob", "alice"):
            received = await client.receive(user)
            first = received[0]
            console.print(f"  {user} received {len(received)} messages, first: "
                          f"[italic]{first.sender}: {first.text}[/]")
        # a long-poll fetch that an enqueue wakes
        waiter = asyncio.create_task(client.receive("bob", wait_s=10))
        await asyncio.sleep(0.3)
        await client.send_text("alice", ["bob"], "are you there?")
        woke = await waiter
        console.print(f"  bob's long-poll woke with: [italic]{woke[0].text}[/]")


def show_metrics(metrics_url: str) -> None:
    text = httpx.get(f"{metrics_url}/metrics", timeout=5).text
    table = Table(title=f"live metrics from {metrics_url}/metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for line in text.splitlines():
        if line.startswith("qpq_") and "_bucket" not in line and "_created" not in line:
            name, _, value = line.rpartition(" ")
            table.add_row(name, value)
    console.print(table)


def node_exporter() -> NodeExporter | None:
    """Host metrics for the CPU/memory/disk triggers, when Debian's node_exporter is here."""
    if not NODE_EXPORTER.exists():
        return None
    try:
        return start_node_exporter(timeout=10)
    except RuntimeError:
        return None


async def background_traffic(srv: RunningServer, profiles: Path, seconds: float) -> None:
    """Keep messages flowing while check-triggers samples, so rates and latencies move."""
    async with srv.connect() as conn:
        client = QpqClient(conn, profiles)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await client.send_text("alice", ["bob"], "background")
            await client.receive("bob")
            await asyncio.sleep(0.1)
    async with srv.connect():
        pass  # a fresh handshake inside the window feeds the handshake-latency trigger


def check_triggers(srv: RunningServer, node: NodeExporter | None, profiles: Path) -> None:
    console.rule("qpq-ops check-triggers (direct mode, no Prometheus needed)")
    command = [str(BIN / "qpq-ops"), "check-triggers", "--metrics-url",
               f"{srv.metrics_url}/metrics", "--sample", "3"]
    if node is not None:
        command += ["--node-metrics-url", node.metrics_url]
    ops = subprocess.Popen(command)
    asyncio.run(background_traffic(srv, profiles, seconds=2.5))
    result = ops.wait(timeout=60)
    ops_code = result
    console.print(f"check-triggers exit code: {ops_code} "
                  "(0 ok, 1 warning, 2 critical, 3 cannot evaluate everything)")


def main() -> int:
    node: NodeExporter | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="qpq-demo-") as tmp:
            console.rule("qpq demo")
            with running_server(Path(tmp)) as srv:
                console.print(f"initialised {srv.data_dir} (TLS cert, secrets in .env 0600)")
                console.print(f"qpq-server up: QUIC on {srv.address} (ALPN qpq/1), "
                              f"metrics on {srv.metrics_url}")
                profiles = Path(tmp) / "profiles"
                asyncio.run(traffic(srv, profiles))
                show_metrics(srv.metrics_url)
                node = node_exporter()
                check_triggers(srv, node, profiles)
            console.print(f"server stopped (exit {srv.process.returncode})")
        return 0
    except KeyboardInterrupt:
        console.print("\ninterrupted: the server was stopped")
        return 130
    except ClientError as exc:
        console.print(f"[red]client error[/]: {exc}")
        return 1
    finally:
        if node is not None:
            node.stop()


if __name__ == "__main__":
    sys.exit(main())
