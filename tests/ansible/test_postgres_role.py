"""The qpq_postgres role for real: deploy.yml against a real PostgreSQL (started by the
test suite, its superuser reached over TCP) with every file written into a temp root."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import stat
import subprocess
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from qpq_server.client import QpqClient
from qpq_server.devserver import free_port
from tests.ansible.runner import (
    AUTH_TOKEN,
    BIN,
    REPO,
    ROLES,
    DeployedServer,
    PlaybookRun,
    ansible_env,
    deploy_vars,
    fake_proc,
    read_env,
    run_playbook,
)
from tests.helpers.postgres import USER, PostgresCluster, pg_bindir, pg_cluster

__all__ = ["pg_cluster"]

pytestmark = pytest.mark.timeout(600)
PASSWORD = "vault-pw-0123456789abcdef"


def _scram_matches() -> Callable[[Any, str], bool]:
    path = ROLES / "qpq_postgres" / "filter_plugins" / "qpq_scram.py"
    spec = importlib.util.spec_from_file_location("qpq_scram", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.qpq_scram_matches  # type: ignore[no-any-return]


def _deploy(work: Path, extra: dict[str, Any], check: bool = False) -> PlaybookRun:
    """deploy.yml with localhost in the qpq_postgres group only (the other plays idle)."""
    return run_playbook("deploy.yml", work, extra, check=check,
                        groups={"qpq_postgres": {"localhost": {}}}, timeout=240)


def _vars(root: Path, cluster: PostgresCluster, **more: Any) -> dict[str, Any]:
    return {
        "qpq_root": str(root), "qpq_service_manager": "none", "ansible_become": False,
        "qpq_postgres_install_packages": False, "qpq_postgres_become_admin": False,
        "qpq_postgres_admin_user": USER, "qpq_postgres_admin_host": "127.0.0.1",
        "qpq_postgres_admin_port": str(cluster.port),
        "qpq_postgres_psql": str(pg_bindir() / "psql"),
        # the test cluster's superuser is `qpq`: the nodes' role gets another name here
        "qpq_postgres_user": "qpq_node", "qpq_postgres_database": "qpq_cluster",
        "qpq_postgres_password": PASSWORD,
        "qpq_postgres_clients": ["10.0.0.11", "10.0.0.12", "fd00::/64"],
        "qpq_postgres_listen_addresses": ["10.0.0.10"],
        **more,
    }


def _role(cluster: PostgresCluster) -> tuple[Any, ...] | None:
    with psycopg.connect(cluster.dsn()) as conn:
        return conn.execute(
            "SELECT r.rolpassword, r.rolsuper, r.rolcanlogin, d.datname IS NOT NULL, "
            "pg_get_userbyid(d.datdba), has_database_privilege('public', d.datname, "
            "'CONNECT') FROM pg_authid r LEFT JOIN pg_database d ON d.datname = "
            "'qpq_cluster' WHERE r.rolname = 'qpq_node'").fetchone()


def test_qpq_postgres_role_creates_role_and_database_idempotently(
        tmp_path: Path, pg_cluster: PostgresCluster) -> None:
    root = tmp_path / "root"
    extra = _vars(root, pg_cluster)
    first = _deploy(tmp_path / "w", extra)
    assert first.rc == 0, first.output[-4000:]
    assert first.changed > 0
    assert PASSWORD not in first.output

    row = _role(pg_cluster)
    assert row is not None
    verifier, superuser, login, has_db, owner, public_connect = row
    assert verifier.startswith("SCRAM-SHA-256$") and _scram_matches()(verifier, PASSWORD)
    assert (superuser, login, has_db, owner, public_connect) == (
        False, True, True, "qpq_node", False)

    etc = root / "etc/postgresql/15/main"
    conf = (etc / "conf.d/qpq.conf").read_text()
    assert "listen_addresses = '10.0.0.10'" in conf
    assert "password_encryption = 'scram-sha-256'" in conf
    hba = [ln.split() for ln in (etc / "pg_hba.conf").read_text().splitlines()
           if ln and not ln.startswith("#")]
    assert hba == [["hostssl", "qpq_cluster", "qpq_node", "10.0.0.11/32", "scram-sha-256"],
                   ["hostssl", "qpq_cluster", "qpq_node", "10.0.0.12/32", "scram-sha-256"],
                   ["hostssl", "qpq_cluster", "qpq_node", "fd00::/64", "scram-sha-256"]]

    second = _deploy(tmp_path / "w", extra)
    assert second.rc == 0, second.output[-4000:]
    assert second.changed == 0, second.changed_tasks()
    checked = _deploy(tmp_path / "w", extra, check=True)
    assert checked.rc == 0 and checked.changed == 0, checked.changed_tasks()

    # A new password in the vault is applied (and only then).
    rotated = _deploy(tmp_path / "w", {**extra, "qpq_postgres_password": PASSWORD + "-2"})
    assert rotated.rc == 0 and rotated.changed == 1, rotated.changed_tasks()
    row = _role(pg_cluster)
    assert row is not None and _scram_matches()(row[0], PASSWORD + "-2")
    assert not _scram_matches()(row[0], PASSWORD)


@pytest.mark.parametrize(("override", "needle"), [
    ({"qpq_postgres_password": "short"}, "qpq_postgres_password"),
    ({"qpq_postgres_password": "has a space in it, too long"}, "qpq_postgres_password"),
    ({"qpq_postgres_clients": []}, "qpq_postgres_clients"),
    ({"qpq_postgres_clients": ["db.example.org"]}, "qpq_postgres_clients"),
    ({"qpq_postgres_user": "Robert'); DROP"}, "identifiers"),
])
def test_qpq_postgres_role_refuses_bad_inputs_before_any_change(
        tmp_path: Path, pg_cluster: PostgresCluster, override: dict[str, Any],
        needle: str) -> None:
    root = tmp_path / "root"
    run = _deploy(tmp_path / "w", _vars(root, pg_cluster, **override))
    assert run.rc != 0 and needle in run.output, run.output[-3000:]
    assert not root.exists()


def test_multi_node_example_inventory_puts_n_nodes_on_one_postgres(tmp_path: Path) -> None:
    example = REPO / "playbooks" / "inventory.multi-node.example.yml"
    env = ansible_env(tmp_path)
    listed = subprocess.run([str(BIN / "ansible-inventory"), "-i", str(example), "--list",
                             "-e", "vault_qpq_postgres_password=x"],
                            env=env, capture_output=True, text=True, timeout=60, check=True)
    inventory = json.loads(listed.stdout)
    nodes = inventory["qpq_cluster"]["hosts"]
    assert len(nodes) >= 2 and len(inventory["qpq_postgres"]["hosts"]) == 1
    hostvars = inventory["_meta"]["hostvars"]
    for node in nodes:
        assert hostvars[node]["qpq_server_storage_backend"] == "postgres"
        assert "qpq_server_workers" in hostvars[node]
    (db,) = inventory["qpq_postgres"]["hosts"]
    targets = hostvars[inventory["monitoring"]["hosts"][0]]["qpq_prometheus_targets"]
    assert len({t["instance"] for t in targets}) == len(nodes)
    assert len(hostvars[db]["qpq_postgres_clients"]) == len(nodes)
    syntax = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(example),
                             "--syntax-check", "playbooks/deploy.yml"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr


@dataclass
class PgNodes:
    """deploy.yml's database and server roles onto two nodes on one PostgreSQL: node1 is
    also the database host (the qpq_postgres role) and runs two workers; node2 joins with
    node1 as its cluster seed. Two roots on this machine, one deploy for the two tests
    below. The other server-side roles do nothing of their own for a PostgreSQL node; they
    run in tests/ansible/test_deploy.py and on the systemd host (tests/host)."""

    base: Path
    work: Path
    extra: dict[str, Any]
    hosts: dict[str, dict[str, Any]]
    dsn: str
    first: PlaybookRun = field(init=False)  # deploy(tags="qpq_postgres,qpq_server")
    _rerun: list[PlaybookRun] = field(default_factory=list)

    def root(self, name: str) -> Path:
        return Path(self.hosts[name]["qpq_root"])

    def server(self, name: str) -> DeployedServer:
        return DeployedServer(self.root(name), str(self.hosts[name]["qpq_server_metrics_listen"]),
                              self.work / f"{name}.log")

    def rerun(self) -> PlaybookRun:
        """The server role's configure and join steps once more, where the database URL
        and the seed's secrets are written (once, by the first caller). The install step's
        rerun is tests/host's second deploy."""
        if not self._rerun:
            self._rerun.append(self.deploy(tags="qpq_server_configure,qpq_server_join"))
        return self._rerun[0]

    def deploy(self, tags: str) -> PlaybookRun:
        """deploy.yml with node1 in qpq_postgres and both nodes in qpq_servers."""
        return run_playbook("deploy.yml", self.work, self.extra, tags=tags, groups={
            "qpq_postgres": {"node1": self.hosts["node1"]}, "qpq_servers": self.hosts})


@pytest.fixture(scope="module")
def pg_nodes(tmp_path_factory: pytest.TempPathFactory, pg_cluster: PostgresCluster,
             qpq_wheel: Path, sysctl_settings: dict[str, int]) -> PgNodes:
    base = tmp_path_factory.mktemp("pg-nodes")
    dsn = f"postgresql://qpq_node:{PASSWORD}@127.0.0.1:{pg_cluster.port}/qpq_cluster"
    extra = {
        **deploy_vars(base / "unused", fake_proc(base / "proc", sysctl_settings), qpq_wheel),
        **_vars(base / "unused", pg_cluster),
        "qpq_server_storage_backend": "postgres", "qpq_server_database_url": dsn,
        "qpq_server_cluster_seed": "node1",
    }
    for per_host in ("qpq_root", "qpq_server_listen", "qpq_server_metrics_listen"):
        extra.pop(per_host)
    hosts: dict[str, dict[str, Any]] = {}
    for name in ("node1", "node2"):
        hosts[name] = {"qpq_root": str(base / name),
                       "qpq_server_listen": f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
                       "qpq_server_metrics_listen": f"127.0.0.1:{free_port()}"}
    hosts["node1"]["qpq_server_workers"] = 2
    nodes = PgNodes(base=base, work=base / "w", extra=extra, hosts=hosts, dsn=dsn)
    nodes.first = nodes.deploy(tags="qpq_postgres,qpq_server")
    return nodes


def test_deploy_puts_a_node_with_workers_on_the_postgres_the_role_made(
        pg_nodes: PgNodes, tmp_path: Path) -> None:
    """deploy.yml with node1 as both the database host and a qpq node (workers = 2,
    backend postgres, QPQ_DATABASE_URL from the vault's password); the deployed server
    then serves a client from that database."""
    run, dsn = pg_nodes.first, pg_nodes.dsn
    assert run.rc == 0, run.output[-4000:]
    assert PASSWORD not in run.output

    data = pg_nodes.root("node1") / "var/lib/qpq"
    config = tomllib.loads((data / "qpq-server.toml").read_text())
    assert config["storage"]["backend"] == "postgres" and config["server"]["workers"] == 2
    assert PASSWORD not in (data / "qpq-server.toml").read_text()
    assert read_env(data / ".env")["QPQ_DATABASE_URL"] == dsn
    assert stat.S_IMODE((data / ".env").stat().st_mode) == 0o600

    server = pg_nodes.server("node1")
    try:
        server.start(timeout=60)

        async def talk() -> None:
            async with server.connect(AUTH_TOKEN) as conn:
                client = QpqClient(conn, tmp_path / "profiles")
                await client.register("alice", "pw-alice")
                await client.register("bob", "pw-bob")
                await client.send_text("alice", ["bob"], "stored in PostgreSQL")

        asyncio.run(talk())
        with psycopg.connect(dsn.replace(f":{PASSWORD}", "")) as conn:
            assert conn.execute("SELECT count(*) FROM messages").fetchone() == (1,)
            assert sorted(conn.execute("SELECT username FROM accounts").fetchall()) == [
                ("alice",), ("bob",)]
    finally:
        server.stop()
    assert PASSWORD not in server.log()


def test_a_second_node_takes_the_seed_nodes_cluster_secrets(
        pg_nodes: PgNodes, tmp_path: Path) -> None:
    """Two nodes (two roots on this machine) with qpq_server_cluster_seed: node2 gets
    node1's OPAQUE setup, session key and KT key, keeps its own certificate, and an account
    registered on node1 logs in on node2."""
    first = pg_nodes.first
    assert first.rc == 0, first.output[-4000:]
    one, two = (pg_nodes.root(n) / "var/lib/qpq" for n in ("node1", "node2"))
    shared = sorted(p.relative_to(one) for d in ("opaque", "keys", "kt")
                    for p in (one / d).rglob("*") if p.is_file())
    assert shared and any(p.parts[0] == "opaque" for p in shared)
    for rel in shared:
        assert (two / rel).read_bytes() == (one / rel).read_bytes(), rel
        assert stat.S_IMODE((two / rel).stat().st_mode) == 0o600, rel
    assert (two / "tls/cert.pem").read_bytes() != (one / "tls/cert.pem").read_bytes()
    again = pg_nodes.rerun()
    assert again.rc == 0 and again.changed == 0, again.changed_tasks()

    servers = [pg_nodes.server(n) for n in ("node1", "node2")]
    try:
        for server in servers:
            server.start(timeout=60)

        async def across() -> None:
            async with servers[0].connect(AUTH_TOKEN) as c1:
                await QpqClient(c1, tmp_path / "p").register("carol", "pw-carol")
            async with servers[1].connect(AUTH_TOKEN) as c2:
                # the same device (profile) as on node1: node2 knows it from the database
                await QpqClient(c2, tmp_path / "p").login("carol", "pw-carol")

        asyncio.run(across())
    finally:
        for server in servers:
            server.stop()
