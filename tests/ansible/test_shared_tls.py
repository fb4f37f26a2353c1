"""One TLS certificate for every node of a cluster (issue 14: clients reach N nodes through
one name): deploy.yml puts the pair from the vault, or from files on the controller, on each
node of the multi-node inventory, and each node serves it."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qpq_server.tls import write_self_signed
from tests.ansible.runner import (
    AUTH_TOKEN,
    BIN,
    REPO,
    DeployedServer,
    ansible_env,
    deploy_vars,
    fake_proc,
    run_playbook,
)

pytestmark = pytest.mark.timeout(900)

SERVERS = ("qpq-a.example.org", "qpq-b.example.org")
NAME = "chat.example.org"  # the one name clients use for every node


def _pair(directory: Path, name: str = NAME) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    write_self_signed(cert, key, name)
    return cert, key


def _cluster(tmp_path: Path, wheel: Path, settings: dict[str, int],
             **tls: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    extra = deploy_vars(Path("/unused"), fake_proc(tmp_path / "proc", settings), wheel)
    shared = {key: extra.pop(key) for key in ("qpq_root", "qpq_server_pip_extra_args")}
    hosts = {name: {**shared, "qpq_root": str(tmp_path / name)} for name in SERVERS}
    return {**extra, **tls}, hosts


async def _ping(server: DeployedServer, ca: Path) -> bool:
    async with server.connect(AUTH_TOKEN, ca=ca) as conn:
        return bool((await conn.call("ping"))["ok"])


def test_every_node_gets_and_serves_the_vault_certificate(
        tmp_path: Path, qpq_wheel: Path, sysctl_settings: dict[str, int]) -> None:
    cert, key = _pair(tmp_path / "vault")
    extra, hosts = _cluster(tmp_path, qpq_wheel, sysctl_settings,
                            qpq_server_tls_certificates="vault",
                            qpq_server_tls_cert_pem=cert.read_text(),
                            qpq_server_tls_key_pem=key.read_text())
    # The server role alone (the other roles have their own tests): install, configure.
    run = run_playbook("deploy.yml", tmp_path / "work", extra, servers=SERVERS,
                       host_vars=hosts, tags="qpq_server")
    assert run.rc == 0, run.output[-4000:]
    assert key.read_text() not in run.output  # no_log on the key
    for name in SERVERS:
        tls = tmp_path / name / "var/lib/qpq/tls"
        assert (tls / "cert.pem").read_bytes() == cert.read_bytes(), name
        assert (tls / "key.pem").read_bytes() == key.read_bytes(), name
        for path in (tls / "cert.pem", tls / "key.pem"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # Each node, in turn on the same ports, answers a client that trusts only that one
    # certificate under the one name.
    for name in SERVERS:
        server = DeployedServer(tmp_path / name, str(extra["qpq_server_metrics_listen"]),
                                tmp_path / f"{name}.log", server_name=NAME)
        server.start()
        try:
            assert asyncio.run(_ping(server, cert)), server.log()
        finally:
            server.stop()
    again = run_playbook("deploy.yml", tmp_path / "work", extra, servers=SERVERS,
                         host_vars=hosts, tags="qpq_server_configure")
    assert again.rc == 0 and again.changed == 0, again.changed_tasks()


def test_controller_files_whose_key_is_not_the_certificates_are_refused_before_any_change(
        tmp_path: Path, qpq_wheel: Path, sysctl_settings: dict[str, int]) -> None:
    cert, _ = _pair(tmp_path / "one")
    _, other_key = _pair(tmp_path / "two")
    extra, hosts = _cluster(tmp_path, qpq_wheel, sysctl_settings,
                            qpq_server_tls_certificates="controller",
                            qpq_server_tls_cert_src=str(cert),
                            qpq_server_tls_key_src=str(other_key))
    run = run_playbook("deploy.yml", tmp_path / "work", extra, servers=SERVERS,
                       host_vars=hosts)
    assert run.rc != 0
    assert ("qpq_server_tls_certificates=controller: the key does not belong to the "
            "certificate") in " ".join(run.output.split())
    assert other_key.read_text() not in run.output
    assert not any((tmp_path / name).exists() for name in SERVERS)


@pytest.mark.parametrize(("case", "message"), [
    ("other-name", "the certificate names other.example.net, localhost, not chat.example.org"),
    ("missing-file", "must be absolute paths of files on the controller"),
    ("acme-hook", "an ACME hook (qpq_server_acme_hook) would replace it"),
])
def test_a_certificate_that_cannot_serve_the_cluster_is_refused(
        tmp_path: Path, qpq_wheel: Path, sysctl_settings: dict[str, int],
        case: str, message: str) -> None:
    cert, key = _pair(tmp_path / "pair", "other.example.net" if case == "other-name" else NAME)
    tls: dict[str, Any] = {"qpq_server_tls_certificates": "controller",
                           "qpq_server_tls_cert_src": str(cert),
                           "qpq_server_tls_key_src": str(key)}
    if case == "missing-file":
        tls["qpq_server_tls_key_src"] = str(tmp_path / "nowhere.pem")
    if case == "acme-hook":
        tls["qpq_server_acme_hook"] = "/etc/letsencrypt/renewal-hooks/deploy/qpq-server"
    extra, hosts = _cluster(tmp_path, qpq_wheel, sysctl_settings, **tls)
    run = run_playbook("deploy.yml", tmp_path / "work", extra, servers=SERVERS,
                       host_vars=hosts, tags="qpq_server_preflight")
    assert run.rc != 0
    assert message in " ".join(run.output.split()), run.output[-3000:]


def test_the_multi_node_example_gives_every_node_the_vaults_certificate(tmp_path: Path) -> None:
    example = REPO / "playbooks" / "inventory.multi-node.example.yml"
    listed = subprocess.run(
        [str(BIN / "ansible-inventory"), "-i", str(example), "--list",
         "-e", "vault_qpq_tls_cert_pem=CERT", "-e", "vault_qpq_tls_key_pem=KEY",
         "-e", "vault_qpq_postgres_password=x"],
        env=ansible_env(tmp_path), capture_output=True, text=True, timeout=60, check=True)
    inventory = json.loads(listed.stdout)
    nodes = inventory["qpq_cluster"]["hosts"]
    hostvars = inventory["_meta"]["hostvars"]
    assert len(nodes) >= 2
    for node in nodes:
        assert hostvars[node]["qpq_server_tls_certificates"] == "vault"
        assert hostvars[node]["qpq_server_tls_cert_pem"] == "{{ vault_qpq_tls_cert_pem }}"
        assert hostvars[node]["qpq_server_tls_key_pem"] == "{{ vault_qpq_tls_key_pem }}"
