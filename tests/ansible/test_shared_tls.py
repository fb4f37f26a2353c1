"""One TLS certificate for every node of a cluster (issue 14: clients reach N nodes through
one name): deploy.yml puts the pair from the vault, or from files on the controller, on each
node of the multi-node inventory, and each node serves it. The same cluster also takes its
federation certificates from the vault (one deploy for both vault checks)."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qpq_server.devserver import free_port
from qpq_server.tls import write_self_signed
from tests.ansible.runner import (
    AUTH_TOKEN,
    BIN,
    REPO,
    DeployedServer,
    PlaybookRun,
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


def _pem_pair(domain: str) -> tuple[str, str, str]:
    """A federation CA, and a certificate + key for `domain` it signed (PEM)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (cert.public_bytes(pem).decode(),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode(),
            ca.public_bytes(pem).decode())


@dataclass
class VaultCluster:
    """SERVERS deployed (the server role) with the TLS pair and the federation
    certificates from the vault."""

    base: Path
    extra: dict[str, Any]
    hosts: dict[str, dict[str, Any]]
    cert: Path
    key: Path
    federation: tuple[str, str, str]  # cert, key, CA (PEM)
    peer: str
    first: PlaybookRun
    _rerun: list[PlaybookRun] = field(default_factory=list)

    def rerun(self) -> PlaybookRun:
        """The server role's configure step once more with the same vars, where the vault's
        certificates are written (run once, by the first caller: the serving test calls it
        after its nodes ran). The install step's rerun is tests/host's second deploy."""
        if not self._rerun:
            self._rerun.append(run_playbook("deploy.yml", self.base / "work", self.extra,
                                            servers=SERVERS, host_vars=self.hosts,
                                            tags="qpq_server_configure"))
        return self._rerun[0]


@pytest.fixture(scope="module")
def vault_cluster(tmp_path_factory: pytest.TempPathFactory, qpq_wheel: Path,
                  sysctl_settings: dict[str, int]) -> VaultCluster:
    base = tmp_path_factory.mktemp("vault-cluster")
    cert, key = _pair(base / "vault")
    federation = _pem_pair(NAME)
    peer = f"127.0.0.1:{free_port()}"
    extra, hosts = _cluster(
        base, qpq_wheel, sysctl_settings,
        qpq_server_tls_certificates="vault", qpq_server_tls_cert_pem=cert.read_text(),
        qpq_server_tls_key_pem=key.read_text(),
        qpq_server_federation_enabled=True, qpq_server_federation_certificates="vault",
        qpq_server_federation_cert_pem=federation[0],
        qpq_server_federation_key_pem=federation[1],
        qpq_server_federation_ca_pem=federation[2],
        qpq_server_federation_listen=f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
        qpq_server_federation_peers=[{"domain": "b.example", "address": peer}],
        # nothing listens at the peer's address: the deploy's doctor would (rightly)
        # fail on it, which is not what these tests are about
        qpq_server_doctor_skip=["federation"])
    # The server role alone (the other roles have their own tests): install, configure.
    first = run_playbook("deploy.yml", base / "work", extra, servers=SERVERS,
                         host_vars=hosts, tags="qpq_server")
    return VaultCluster(base=base, extra=extra, hosts=hosts, cert=cert, key=key,
                        federation=federation, peer=peer, first=first)


def test_every_node_gets_and_serves_the_vault_certificate(vault_cluster: VaultCluster) -> None:
    cluster, cert, key = vault_cluster, vault_cluster.cert, vault_cluster.key
    run = cluster.first
    assert run.rc == 0, run.output[-4000:]
    assert key.read_text() not in run.output  # no_log on the key
    for name in SERVERS:
        tls = cluster.base / name / "var/lib/qpq/tls"
        assert (tls / "cert.pem").read_bytes() == cert.read_bytes(), name
        assert (tls / "key.pem").read_bytes() == key.read_bytes(), name
        for path in (tls / "cert.pem", tls / "key.pem"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # Each node, in turn on the same ports, answers a client that trusts only that one
    # certificate under the one name.
    for name in SERVERS:
        server = DeployedServer(cluster.base / name,
                                str(cluster.extra["qpq_server_metrics_listen"]),
                                cluster.base / f"{name}.log", server_name=NAME)
        server.start()
        try:
            assert asyncio.run(_ping(server, cert)), server.log()
        finally:
            server.stop()
    again = cluster.rerun()
    assert again.rc == 0 and again.changed == 0, again.changed_tasks()


def test_vault_certificates_land_in_the_data_dir_and_the_config_names_them(
        vault_cluster: VaultCluster) -> None:
    """The federation certificates from the vault (moved here from test_federation.py)."""
    cert, key, ca = vault_cluster.federation
    first = vault_cluster.first
    for name in SERVERS:
        data = vault_cluster.base / name / "var/lib/qpq"
        written = {kind: data / f"federation-{kind}.pem" for kind in ("cert", "key", "ca")}
        assert written["cert"].read_text() == cert and written["ca"].read_text() == ca
        assert written["key"].read_text() == key
        assert stat.S_IMODE(written["key"].stat().st_mode) == 0o600
        assert stat.S_IMODE(written["cert"].stat().st_mode) == 0o644
        fed = tomllib.loads((data / "qpq-server.toml").read_text())["federation"]
        assert fed["enabled"] is True and fed["domain"] == "chat.example.org"
        assert (fed["federation_cert"], fed["federation_key"], fed["federation_ca"]) == (
            str(written["cert"]), str(written["key"]), str(written["ca"]))
        assert fed["peers"] == [{"domain": "b.example", "address": vault_cluster.peer}]
    assert "BEGIN PRIVATE KEY" not in first.output  # no_log: the key is never printed
    assert first.rc == 0, first.output[-4000:]
    second = vault_cluster.rerun()
    assert second.rc == 0 and second.changed == 0, second.changed_tasks()


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
