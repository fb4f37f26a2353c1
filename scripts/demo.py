"""`make demo`: a real qpq server on loopback, two users, real traffic, live metrics.

Initialises a throwaway data dir, starts `qpq-server run` (SQLCipher storage), registers
alice and bob, sends a batch of end-to-end-encrypted messages both ways, receives them,
prints the server's live `qpq_*` metrics, runs `qpq-ops check-triggers` on them, and
stops the server. Ctrl-C at any point stops the server and removes the data dir.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import httpx
import tomli_w
from rich.console import Console
from rich.table import Table

from qpq_server.client import ClientError, QpqClient, connect
from qpq_server.secrets import read_env_file

console = Console()
BIN = Path(sys.executable).parent
MESSAGES_EACH_WAY = 25


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init(data_dir: Path) -> tuple[Path, str, str]:
    subprocess.run([str(BIN / "qpq-server"), "init", "--data-dir", str(data_dir)], check=True,
                   stdout=subprocess.DEVNULL)
    config_path = data_dir / "qpq-server.toml"
    config = tomllib.loads(config_path.read_text())
    quic = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    metrics = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    config["server"]["listen"] = quic
    config["metrics"]["listen"] = metrics
    config_path.write_text(tomli_w.dumps(config))
    return config_path, quic, metrics


def wait_ready(metrics: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"qpq-server exited early with {process.returncode}")
        try:
            if httpx.get(f"http://{metrics}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("qpq-server did not become ready within 20 s")


async def traffic(quic: str, token: str, ca: Path, profiles: Path) -> None:
    async with connect(quic, token, ca=ca, server_name="localhost") as conn:
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


def show_metrics(metrics: str) -> None:
    text = httpx.get(f"http://{metrics}/metrics", timeout=5).text
    table = Table(title=f"live metrics from http://{metrics}/metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for line in text.splitlines():
        if line.startswith("qpq_") and "_bucket" not in line and "_created" not in line:
            name, _, value = line.rpartition(" ")
            table.add_row(name, value)
    console.print(table)


NODE_EXPORTER = Path("/usr/bin/prometheus-node-exporter")


def start_node_exporter() -> tuple[subprocess.Popen[bytes] | None, str | None]:
    """Host metrics for the CPU/memory/disk triggers, when Debian's node_exporter is here."""
    if not NODE_EXPORTER.exists():
        return None, None
    address = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    process = subprocess.Popen([str(NODE_EXPORTER), f"--web.listen-address={address}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://{address}/metrics", timeout=1)
            return process, f"http://{address}/metrics"
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    return None, None


async def background_traffic(quic: str, token: str, ca: Path, profiles: Path,
                             seconds: float) -> None:
    """Keep messages flowing while check-triggers samples, so rates and latencies move."""
    async with connect(quic, token, ca=ca, server_name="localhost") as conn:
        client = QpqClient(conn, profiles)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await client.send_text("alice", ["bob"], "background")
            await client.receive("bob")
            await asyncio.sleep(0.1)
    async with connect(quic, token, ca=ca, server_name="localhost") as conn:
        pass  # a fresh handshake inside the window feeds the handshake-latency trigger


def check_triggers(metrics: str, node_url: str | None, traffic_args: tuple[str, str, Path, Path],
                   ) -> None:
    console.rule("qpq-ops check-triggers (direct mode, no Prometheus needed)")
    command = [str(BIN / "qpq-ops"), "check-triggers", "--metrics-url",
               f"http://{metrics}/metrics", "--sample", "3"]
    if node_url:
        command += ["--node-metrics-url", node_url]
    ops = subprocess.Popen(command)
    asyncio.run(background_traffic(*traffic_args, seconds=2.5))
    result = ops.wait(timeout=60)
    ops_code = result
    console.print(f"check-triggers exit code: {ops_code} "
                  "(0 ok, 1 warning, 2 critical, 3 cannot evaluate everything)")


def main() -> int:
    data_dir = Path(tempfile.mkdtemp(prefix="qpq-demo-"))
    process: subprocess.Popen[bytes] | None = None
    node: subprocess.Popen[bytes] | None = None
    try:
        console.rule("qpq demo")
        config_path, quic, metrics = init(data_dir / "data")
        console.print(f"initialised {data_dir / 'data'} (TLS cert, secrets in .env 0600)")
        secrets = read_env_file(config_path.parent / ".env")
        env = {k: v for k, v in os.environ.items() if not k.startswith("QPQ_")}
        log = (data_dir / "server.log").open("wb")
        process = subprocess.Popen([str(BIN / "qpq-server"), "run", "--config", str(config_path)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_ready(metrics, process)
        console.print(f"qpq-server up: QUIC on {quic} (ALPN qpq/1), metrics on {metrics}")
        traffic_args = (quic, secrets["QPQ_AUTH_TOKEN"], data_dir / "data" / "tls" / "cert.pem",
                        data_dir / "profiles")
        asyncio.run(traffic(*traffic_args))
        show_metrics(metrics)
        node, node_url = start_node_exporter()
        check_triggers(metrics, node_url, traffic_args)
        return 0
    except KeyboardInterrupt:
        console.print("\ninterrupted: stopping the server")
        return 130
    except ClientError as exc:
        console.print(f"[red]client error[/]: {exc}")
        return 1
    finally:
        if node is not None:
            node.terminate()
            node.wait(timeout=10)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
            console.print(f"server stopped (exit {process.returncode})")
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
