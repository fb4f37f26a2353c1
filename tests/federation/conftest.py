"""Two federated qpq servers (a.example, b.example) on loopback, certificates made by
the test with `qpq-server federation init-ca / issue-cert`."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qpq_server.client import QpqClient
from qpq_server.devserver import (
    BIN,
    RunningServer,
    init_server_dir,
    start_server,
)
from qpq_server.secrets import read_env_file, write_env_file
from tests.helpers.postgres import pg_cluster

__all__ = ["pg_cluster"]  # the session's PostgreSQL, started only when a test asks

DOMAINS = ("a.example", "b.example")


def qpq_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "qpq-server"), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def make_ca(directory: Path) -> Path:
    done = qpq_server("federation", "init-ca", "--out", str(directory))
    assert done.returncode == 0, done.stderr
    return directory


def issue(ca: Path, domain: str, out: Path) -> Path:
    done = qpq_server("federation", "issue-cert", "--ca", str(ca), "--domain", domain,
                      "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


@dataclass
class Site:
    """One federated server: its domain, config, and (when running) the process."""

    domain: str
    config_path: Path
    fed_port: int
    server: RunningServer | None = None

    @property
    def running(self) -> RunningServer:
        assert self.server is not None
        return self.server

    def start(self) -> RunningServer:
        self.server = start_server(self.config_path)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    @asynccontextmanager
    async def client(self, profiles: Path) -> AsyncIterator[QpqClient]:
        async with self.running.connect() as conn:
            yield QpqClient(conn, profiles / f"client-{self.domain}")


def cli(srv: RunningServer, profile: Path, *args: str,
        password: str = "pw") -> subprocess.CompletedProcess[str]:
    """The real `qpq-client` against one site."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPQ_")}
    env.update(QPQ_AUTH_TOKEN=srv.auth_token, QPQ_PASSWORD=password)
    return subprocess.run(
        [str(BIN / "qpq-client"), "--server", srv.address, "--ca", str(srv.ca_cert),
         "--server-name", "localhost", "--profile", str(profile), *args],
        capture_output=True, text=True, timeout=60, env=env)


def federation_section(domain: str, certs: Path, ca: Path, port: int,
                       peers: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "domain": domain, "listen": f"127.0.0.1:{port}",
            "federation_cert": str(certs / "federation-cert.der"),
            "federation_key": str(certs / "federation-key.der"),
            "federation_ca": str(ca / "federation-ca.der"),
            "peers": peers, "retry_base_s": 0.2, "retry_max_s": 1.0,
            "poll_interval_s": 0.5, "probe_interval_s": 1.0, "connect_timeout_s": 3.0,
            **extra}


def distinct_udp_ports(count: int) -> list[int]:
    """Free UDP ports, all different (held open together while the kernel picks)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@functools.cache
def _pki_template() -> Path:
    """One federation CA with a certificate per domain, made once per test process:
    three `qpq-server` runs (~1.2 CPU-s) that every make_sites call repeated. Each test
    gets its own copy (it may rewrite or replace files); a test about the CA or
    issuing makes its own with make_ca / issue."""
    root = Path(tempfile.mkdtemp(prefix="qpq-fed-pki-"))
    atexit.register(shutil.rmtree, root, True)
    ca = make_ca(root / "ca")
    for domain in DOMAINS:
        issue(ca, domain, root / f"certs-{domain}")
    return root


def make_sites(root: Path, overrides: dict[str, dict[str, Any]] | None = None,
               dsns: tuple[str, str] | None = None, **extra: Any) -> tuple[Site, Site]:
    """Configs for a.example and b.example peering with each other (`extra` goes into
    [federation], `overrides` into the other sections; `dsns`: each site's PostgreSQL
    database, written to its .env)."""
    template = _pki_template()
    ca = shutil.copytree(template / "ca", root / "ca")
    fed_a, fed_b, quic_a, quic_b = distinct_udp_ports(4)
    ports = dict(zip(DOMAINS, (fed_a, fed_b), strict=True))
    quic = dict(zip(DOMAINS, (quic_a, quic_b), strict=True))
    sites = []
    for domain in DOMAINS:
        other = next(d for d in DOMAINS if d != domain)
        certs = shutil.copytree(template / f"certs-{domain}", root / f"certs-{domain}")
        section = federation_section(domain, certs, ca, ports[domain],
                                     [{"domain": other, "address": f"127.0.0.1:{ports[other]}"}],
                                     **extra)
        sections = {"rate_limit": {"enabled": False}, **(overrides or {})}
        sections["server"] = {**sections.get("server", {}),
                              "listen": f"127.0.0.1:{quic[domain]}"}
        config = init_server_dir(root / domain, {"federation": section, **sections})
        if dsns is not None:
            env = read_env_file(config.parent / ".env")
            write_env_file(config.parent / ".env",
                           {**env, "QPQ_DATABASE_URL": dsns[DOMAINS.index(domain)]})
        sites.append(Site(domain, config, ports[domain]))
    return sites[0], sites[1]


@contextmanager
def started_sites(root: Path) -> Iterator[tuple[Site, Site]]:
    """make_sites(root), both started, both stopped afterwards."""
    a, b = make_sites(root)
    a.start()
    b.start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    with started_sites(tmp_path) as pair:
        yield pair
