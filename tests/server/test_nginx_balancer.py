"""A real nginx (Debian's, stream module) as one UDP address in front of two qpq nodes on
one PostgreSQL: a client through the balancer exchanges messages with a client of the
other node. The nginx config is docs/operations/nginx-qpq-udp.conf with loopback
addresses put in."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from qpq_server.client import QpqClient, connect
from tests.helpers.ports import free_port
from tests.helpers.postgres import PostgresCluster, pg_cluster
from tests.helpers.server import RunningServer, start_server
from tests.server.test_postgres_nodes import client_of, join_node, make_node_a, until

__all__ = ["pg_cluster"]

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "docs" / "operations" / "nginx-qpq-udp.conf"
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


def balancer_config(nodes: list[str], port: int) -> str:
    """The committed stream config with these upstreams and this listen port."""
    text = CONF.read_text()
    servers = re.findall(r"^\s*server \d+\.\d+\.\d+\.\d+:\d+ .*;$", text, re.MULTILINE)
    assert len(servers) == 2, "the committed config names two example nodes"
    for line, node in zip(servers, nodes, strict=True):
        text = text.replace(line, re.sub(r"\d+\.\d+\.\d+\.\d+:\d+", node, line), 1)
    text, n = re.subn(r"listen 7000 udp", f"listen 127.0.0.1:{port} udp", text)
    assert n == 1
    return text


@contextmanager
def nginx(directory: Path, nodes: list[str]) -> Iterator[str]:
    """nginx in the foreground with only the stream block; yields its UDP address."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists() or not STREAM_MODULE.exists():
        raise RuntimeError("nginx with its stream module is missing: run `make sysdeps` "
                           "(Debian nginx + libnginx-mod-stream)")
    directory.mkdir(parents=True)
    port = free_port(socket.SOCK_DGRAM)
    main = directory / "nginx.conf"
    main.write_text(
        f"load_module {STREAM_MODULE};\n"
        f"pid {directory / 'nginx.pid'};\n"
        f"error_log {directory / 'error.log'} info;\n"
        "daemon off;\nworker_processes 2;\nevents { worker_connections 256; }\n"
        + balancer_config(nodes, port))
    check = subprocess.run([binary, "-t", "-p", str(directory), "-c", str(main),
                            "-e", str(directory / "error.log")],
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([binary, "-p", str(directory), "-c", str(main),
                             "-e", str(directory / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not (directory / "nginx.pid").exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def two_nodes_one_name(tmp_path: Path, dsn: str) -> Iterator[tuple[RunningServer, ...]]:
    """Two nodes of one cluster that present the same certificate: behind one address,
    a client must trust whichever node it reaches for the one name it dialled."""
    a_config = make_node_a(tmp_path / "a", dsn)
    b_config = join_node(tmp_path / "b", tmp_path / "a")
    for name in ("cert.pem", "key.pem"):
        shutil.copy2(tmp_path / "a" / "tls" / name, tmp_path / "b" / "tls" / name)
    a = start_server(a_config)
    try:
        b = start_server(b_config)
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


async def test_a_client_through_nginx_talks_to_a_client_on_the_other_node(
        tmp_path: Path, pg_cluster: PostgresCluster) -> None:
    with two_nodes_one_name(tmp_path, pg_cluster.new_database()) as (a, b), \
            nginx(tmp_path / "nginx", [a.address, b.address]) as front:
        async with connect(front, a.auth_token, ca=a.ca_cert, server_name="localhost",
                           timeout=15) as conn:
            alice = QpqClient(conn, tmp_path / "profiles")  # the devices of both users
            await alice.register("alice", "pw-a")
            await alice.register("bob", "pw-b")
            # Which node did the balancer pick? The one where alice's fetch is parked.
            parked = asyncio.create_task(alice.receive("alice", wait_s=30))
            nodes: dict[str, RunningServer] = {"a": a, "b": b}
            await until(lambda: any(n.metric("qpq_delivery_waiters") >= 1
                                    for n in nodes.values()), "alice's fetch is parked")
            behind = next(k for k, n in nodes.items() if n.metric("qpq_delivery_waiters") >= 1)
            other = nodes["b" if behind == "a" else "a"]
            async with client_of(other, tmp_path / "profiles") as bob:
                await bob.login("bob", "pw-b")
                await bob.send_text("bob", ["alice"], "to alice, from the other node")
                got = await asyncio.wait_for(parked, 20)
                assert [m.text for m in got] == ["to alice, from the other node"]
                await alice.send_text("alice", ["bob"], "to bob, through nginx")
                assert [m.text for m in await bob.receive("bob")] == [
                    "to bob, through nginx"]


def test_committed_config_is_valid_nginx(tmp_path: Path) -> None:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    main = tmp_path / "nginx.conf"
    main.write_text(f"load_module {STREAM_MODULE};\npid {tmp_path / 'pid'};\n"
                    "events {}\n" + CONF.read_text())
    check = subprocess.run([binary, "-t", "-p", str(tmp_path), "-c", str(main),
                            "-e", str(tmp_path / "error.log")],
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stderr
