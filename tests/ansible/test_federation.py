"""Federation in the playbooks: the firewall opens the federation port only while
federation is on, and only to the peers' addresses when they are known; the example
inventory federates two single-node deployments. That the server role writes vault
certificates into the data dir and names them in the config is checked on the vault
cluster that tests/ansible/test_shared_tls.py deploys anyway (one deploy for both).

Real `ansible-playbook` runs into temporary roots (no systemd, no nft load)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.ansible.runner import (
    BIN,
    GRAFANA_PASSWORD,
    ansible_env,
    fake_proc,
    run_playbook,
)

pytestmark = pytest.mark.timeout(600)

PLAYBOOKS = Path(__file__).resolve().parents[2] / "playbooks"


def firewall_vars(root: Path, proc: Path, **extra: Any) -> dict[str, Any]:
    """Only what the preflight of every role and the firewall role need (no wheel)."""
    return {
        "qpq_root": str(root), "qpq_service_manager": "none", "ansible_become": False,
        "qpq_sysctl_proc_root": str(proc), "qpq_server_domain": "a.example",
        "qpq_server_python": sys.executable,
        "qpq_server_listen": "0.0.0.0:7000", "qpq_server_federation_listen": "0.0.0.0:7443",
        "qpq_prometheus_install_packages": False, "qpq_grafana_install": False,
        "qpq_grafana_admin_password": GRAFANA_PASSWORD,
        # certificate files on the host (the server role's preflight wants them with
        # federation on; the firewall does not read them)
        "qpq_server_federation_cert": "/etc/qpq/federation-cert.der",
        "qpq_server_federation_key": "/etc/qpq/federation-key.der",
        "qpq_server_federation_ca": "/etc/qpq/federation-ca.der",
        **extra,
    }


def nft_rules(root: Path) -> list[str]:
    text = (root / "etc/nftables.d/qpq.nft").read_text()
    return [line.strip() for line in text.splitlines() if "accept" in line]


@pytest.fixture
def proc(tmp_path: Path, sysctl_settings: dict[str, int]) -> Path:
    return fake_proc(tmp_path / "proc", sysctl_settings)


def test_federation_port_stays_closed_while_federation_is_off(tmp_path: Path,
                                                              proc: Path) -> None:
    root = tmp_path / "root"
    run = run_playbook("deploy.yml", tmp_path / "work", firewall_vars(root, proc),
                       tags="qpq_firewall")
    assert run.rc == 0, run.output[-3000:]
    rules = nft_rules(root)
    assert "udp dport { 7000 } accept" in rules
    assert not [r for r in rules if "7443" in r], rules


def test_federation_port_opens_to_the_peers_addresses_only_and_is_idempotent(
        tmp_path: Path, proc: Path) -> None:
    root = tmp_path / "root"
    peers = [{"domain": "b.example", "address": "192.0.2.10:7443"},
             {"domain": "c.example", "address": "[2001:db8::7]:7001"}]
    extra = firewall_vars(root, proc, qpq_server_federation_enabled=True,
                          qpq_server_federation_peers=peers)
    first = run_playbook("deploy.yml", tmp_path / "work", extra, tags="qpq_firewall")
    assert first.rc == 0, first.output[-3000:]
    rules = nft_rules(root)
    assert "ip saddr { 192.0.2.10 } udp dport 7443 accept" in rules
    assert "ip6 saddr { 2001:db8::7 } udp dport 7443 accept" in rules
    assert "udp dport { 7000 } accept" in rules  # QUIC for clients stays public
    second = run_playbook("deploy.yml", tmp_path / "work", extra, tags="qpq_firewall")
    assert second.rc == 0 and second.changed == 0, second.changed_tasks()


def test_a_peer_named_by_dns_opens_the_federation_port_to_everyone(tmp_path: Path,
                                                                    proc: Path) -> None:
    root = tmp_path / "root"
    extra = firewall_vars(root, proc, qpq_server_federation_enabled=True,
                          qpq_server_federation_peers=[
                              {"domain": "b.example", "address": "qpq.b.example:7443"}])
    run = run_playbook("deploy.yml", tmp_path / "work", extra, tags="qpq_firewall")
    assert run.rc == 0, run.output[-3000:]
    rules = nft_rules(root)
    assert "ip saddr { 0.0.0.0/0 } udp dport 7443 accept" in rules
    assert "ip6 saddr { ::/0 } udp dport 7443 accept" in rules
    # ... unless the operator names the peers' networks
    narrowed = {**extra, "qpq_firewall_federation_sources": ["198.51.100.0/24"]}
    run = run_playbook("deploy.yml", tmp_path / "work", narrowed, tags="qpq_firewall")
    assert run.rc == 0, run.output[-3000:]
    assert [r for r in nft_rules(root) if "7443" in r] == [
        "ip saddr { 198.51.100.0/24 } udp dport 7443 accept"]


def test_a_federation_source_that_is_no_address_stops_in_preflight(tmp_path: Path,
                                                                   proc: Path) -> None:
    root = tmp_path / "root"
    extra = firewall_vars(root, proc, qpq_server_federation_enabled=True,
                          qpq_firewall_federation_sources=["peers.example"])
    run = run_playbook("deploy.yml", tmp_path / "work", extra, tags="qpq_firewall")
    assert run.rc != 0
    assert "qpq_firewall_federation_sources" in run.output
    assert not (root / "etc/nftables.d/qpq.nft").exists()


def test_vault_certificates_without_pem_stop_in_preflight(tmp_path: Path, proc: Path) -> None:
    extra = firewall_vars(tmp_path / "root", proc, qpq_server_federation_enabled=True,
                          qpq_server_federation_certificates="vault",
                          qpq_server_federation_cert_pem="not a certificate")
    run = run_playbook("deploy.yml", tmp_path / "work", extra, tags="qpq_server")
    assert run.rc != 0
    assert "qpq_server_federation_cert_pem" in run.output
    assert "not a certificate" not in run.output.split("fatal", 1)[-1].split("msg", 1)[0]


def test_example_inventory_federates_two_single_node_deployments(tmp_path: Path) -> None:
    run = subprocess.run([str(BIN / "ansible-inventory"), "-i",
                          str(PLAYBOOKS / "inventory.example.yml"), "--list"],
                         env=ansible_env(tmp_path), capture_output=True, text=True,
                         timeout=60, check=True)
    inventory = json.loads(run.stdout)
    hosts = inventory["federated"]["hosts"]
    assert len(hosts) == 2
    hostvars = {h: inventory["_meta"]["hostvars"][h] for h in hosts}
    domains = {h: v["qpq_server_domain"] for h, v in hostvars.items()}
    for host, values in hostvars.items():
        assert values["qpq_server_federation_enabled"] is True
        (peer,) = values["qpq_server_federation_peers"]
        (other,) = set(hosts) - {host}
        # each names the other: its domain, and its host on the federation port
        assert peer["domain"] == domains[other]
        assert peer["address"] == f"{other}:7001"
    # each is a single-node deployment: server and its own monitoring
    assert "federated" in inventory["qpq_servers"]["children"]
    assert "federated" in inventory["qpq_monitoring"]["children"]
