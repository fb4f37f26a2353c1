"""qpq-ops doctor's federation checks: real certificate files made with `cryptography`,
a real QUIC listener on 127.0.0.1 (aioquic, the federation ALPN) and a dead port."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aioquic.asyncio import serve
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from qpq_ops.deployment import Deployment, load_deployment
from qpq_ops.doctor import CheckResult, CheckState, DoctorInputs, run_doctor
from qpq_ops.doctor.federation import FEDERATION_ALPN, probe_peer
from qpq_ops.triggers import TLS_EXPIRY_CRITICAL_S, TLS_EXPIRY_WARNING_S
from qpq_server.config import FederationPeer
from tests.helpers.ports import free_port
from tests.helpers.server import init_data_dir

DAY = 86_400

Key = ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str = "test federation CA") -> tuple[x509.Certificate, Key]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_leaf(ca: tuple[x509.Certificate, Key], domain: str, *, expires_in_s: float,
              ) -> tuple[x509.Certificate, Key]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(domain)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=400))
            .not_valid_after(now + dt.timedelta(seconds=expires_in_s))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def key_der(key: Key) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_files(data: Path, ca: x509.Certificate, leaf: tuple[x509.Certificate, Key]) -> None:
    """DESIGN.md's file names, DER as `qpq-server federation issue-cert` writes them."""
    (data / "federation-ca.der").write_bytes(der(ca))
    (data / "federation-cert.der").write_bytes(der(leaf[0]))
    (data / "federation-key.der").write_bytes(key_der(leaf[1]))


class Listener:
    """An aioquic QUIC listener on 127.0.0.1 in its own event loop thread."""

    def __init__(self, cert: x509.Certificate, key: Key, alpn: str = FEDERATION_ALPN) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.configuration = QuicConfiguration(is_client=False, alpn_protocols=[alpn])
        self.configuration.certificate = cert
        self.configuration.private_key = key
        self.server: QuicServer | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Listener:
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(
            serve("127.0.0.1", self.port, configuration=self.configuration), self.loop)
        self.server = future.result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, Key]:
    return make_ca()


@pytest.fixture(scope="module")
def peer_b(ca: tuple[x509.Certificate, Key]) -> Iterator[Listener]:
    cert, key = make_leaf(ca, "b.example", expires_in_s=365 * DAY)
    with Listener(cert, key) as listener:
        yield listener


@pytest.fixture
def deployment(tmp_path: Path, ca: tuple[x509.Certificate, Key]) -> Deployment:
    config = init_data_dir(tmp_path / "a")
    write_files(config.parent, ca[0], make_leaf(ca, "a.example", expires_in_s=365 * DAY))
    return load_deployment(config)


def federating(dep: Deployment, *peers: FederationPeer, **values: object) -> Deployment:
    """`dep` as if its config enabled federation as a.example with these peers. (Built
    directly: main's qpq-server still refuses `enabled = true` until relaying lands.)"""
    fed = dataclasses.replace(
        dep.config.federation, enabled=True, domain="a.example",
        federation_cert="federation-cert.der", federation_key="federation-key.der",
        federation_ca="federation-ca.der", peers=peers)
    fed = dataclasses.replace(fed, **values)  # type: ignore[arg-type]
    return dataclasses.replace(dep, config=dataclasses.replace(dep.config, federation=fed))


def federation_rows(dep: Deployment, timeout: float = 2.0) -> dict[str, CheckResult]:
    others = ("sysctl", "nofile", "config", "readyz", "tls_cert", "disk", "backup", "clock",
              "prometheus", "database")
    inputs = DoctorInputs(config_path=dep.config_path, deployment=dep, prometheus_url=None,
                          plan=None, textfile_dir=dep.data_dir, now=time.time(),
                          timeout=timeout, skip=frozenset(others))
    return {r.id: r for r in run_doctor(inputs)}


def test_disabled_federation_is_one_skipped_row(deployment: Deployment) -> None:
    rows = federation_rows(deployment)
    assert list(rows) == ["federation"]
    row = rows["federation"]
    assert row.state is CheckState.SKIPPED and "enabled = false" in row.detail


def test_good_certificate_and_reachable_peer_are_ok(deployment: Deployment,
                                                   peer_b: Listener) -> None:
    dep = federating(deployment, FederationPeer("b.example", peer_b.address))
    rows = federation_rows(dep)
    assert list(rows) == ["federation_cert", "federation_peer:b.example"]
    cert, peer = rows["federation_cert"], rows["federation_peer:b.example"]
    assert cert.state is CheckState.OK and "a.example" in cert.detail, cert
    assert 364 < cert.value < 366
    assert peer.state is CheckState.OK, peer
    assert "handshake completed" in peer.detail
    assert "certificate signed by the federation CA for b.example" in peer.detail


def test_unreachable_peer_is_critical_within_the_timeout(deployment: Deployment,
                                                         peer_b: Listener) -> None:
    dead = f"127.0.0.1:{free_port()}"
    dep = federating(deployment, FederationPeer("b.example", peer_b.address),
                     FederationPeer("c.example", dead), FederationPeer("d.example", ""))
    started = time.monotonic()
    rows = federation_rows(dep, timeout=0.8)
    assert time.monotonic() - started < 5
    down = rows["federation_peer:c.example"]
    assert down.state is CheckState.CRITICAL, down
    assert dead in down.detail and "UDP" in down.fix
    assert rows["federation_peer:b.example"].state is CheckState.OK
    # a peer without an address connects to us: nothing to probe
    assert rows["federation_peer:d.example"].state is CheckState.SKIPPED


@pytest.mark.parametrize(("issuer", "domain", "expires_in_s", "why"), [
    ("other", "b.example", 365 * DAY, "refused"),
    ("ours", "z.example", 365 * DAY, "doesn't match"),
    ("ours", "b.example", -DAY, "no longer valid"),
])
def test_a_peer_certificate_the_relay_would_refuse_is_critical(
        deployment: Deployment, ca: tuple[x509.Certificate, Key], issuer: str, domain: str,
        expires_in_s: float, why: str) -> None:
    signer = ca if issuer == "ours" else make_ca("someone else's CA")
    cert, key = make_leaf(signer, domain, expires_in_s=expires_in_s)
    with Listener(cert, key) as bad:
        rows = federation_rows(federating(deployment, FederationPeer("b.example",
                                                                     bad.address)))
    row = rows["federation_peer:b.example"]
    assert row.state is CheckState.CRITICAL, row
    assert "certificate is refused" in row.detail and why in row.detail, row
    assert "federation CA" in row.fix


def test_any_answer_counts_as_reachable(ca: tuple[x509.Certificate, Key]) -> None:
    # a listener that speaks another protocol refuses the handshake: the path is open
    cert, key = make_leaf(ca, "b.example", expires_in_s=DAY * 30)
    with Listener(cert, key, alpn="something-else") as other:
        result = probe_peer("127.0.0.1", other.port, "b.example", 2.0)
    assert result.reachable and "closed the handshake" in result.detail, result


@pytest.mark.parametrize(("expires_in_s", "state"), [
    (TLS_EXPIRY_WARNING_S + DAY, CheckState.OK),
    (TLS_EXPIRY_WARNING_S - DAY, CheckState.WARNING),
    (TLS_EXPIRY_CRITICAL_S - DAY, CheckState.CRITICAL),
    (-DAY, CheckState.CRITICAL),
])
def test_certificate_expiry_follows_the_tls_thresholds(
        deployment: Deployment, ca: tuple[x509.Certificate, Key], expires_in_s: float,
        state: CheckState) -> None:
    write_files(deployment.data_dir, ca[0], make_leaf(ca, "a.example",
                                                      expires_in_s=expires_in_s))
    row = federation_rows(federating(deployment))["federation_cert"]
    assert row.state is state, row
    if state is not CheckState.OK:
        assert row.fix.startswith("qpq-ops rotate federation --config")
    if expires_in_s < 0:
        assert "expired" in row.detail


def test_certificate_of_another_ca_is_critical(deployment: Deployment) -> None:
    other = make_ca("someone else's CA")
    (deployment.data_dir / "federation-cert.der").write_bytes(
        der(make_leaf(other, "a.example", expires_in_s=365 * DAY)[0]))
    row = federation_rows(federating(deployment))["federation_cert"]
    assert row.state is CheckState.CRITICAL and "not signed by the federation CA" in row.detail


def test_certificate_for_another_domain_is_critical(deployment: Deployment,
                                                    ca: tuple[x509.Certificate, Key]) -> None:
    write_files(deployment.data_dir, ca[0], make_leaf(ca, "z.example", expires_in_s=99 * DAY))
    row = federation_rows(federating(deployment))["federation_cert"]
    assert row.state is CheckState.CRITICAL, row
    assert "z.example" in row.detail and "'a.example'" in row.detail


def test_key_that_does_not_match_the_certificate_is_critical(
        deployment: Deployment, ca: tuple[x509.Certificate, Key]) -> None:
    (deployment.data_dir / "federation-key.der").write_bytes(
        key_der(ec.generate_private_key(ec.SECP256R1())))
    row = federation_rows(federating(deployment))["federation_cert"]
    assert row.state is CheckState.CRITICAL and "does not belong" in row.detail


@pytest.mark.parametrize(("name", "content", "found"), [
    ("federation-cert.der", None, "cannot read"),
    ("federation-ca.der", b"not a certificate", "does not parse"),
    ("federation-key.der", b"\x30\x03garbage", "does not parse"),
])
def test_missing_or_garbage_files_are_critical(deployment: Deployment, name: str,
                                               content: bytes | None, found: str) -> None:
    path = deployment.data_dir / name
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    row = federation_rows(federating(deployment))["federation_cert"]
    assert row.state is CheckState.CRITICAL and found in row.detail, row
    if content is None:
        assert str(path) in row.detail


def test_unset_path_is_critical(deployment: Deployment) -> None:
    row = federation_rows(federating(deployment, federation_ca=""))["federation_cert"]
    assert row.state is CheckState.CRITICAL and "federation_ca is not set" in row.detail


def test_pem_files_as_rotate_writes_them_are_read(deployment: Deployment,
                                                  ca: tuple[x509.Certificate, Key]) -> None:
    cert, key = make_leaf(ca, "a.example", expires_in_s=200 * DAY)
    data = deployment.data_dir
    (data / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (data / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    other_ca = make_ca("previous CA")[0]
    # a bundle (new CA + previous) during a CA rotation
    (data / "ca-bundle.pem").write_bytes(b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in (other_ca, ca[0])))
    dep = federating(deployment, federation_cert="cert.pem", federation_key="key.pem",
                     federation_ca="ca-bundle.pem")
    row = federation_rows(dep)["federation_cert"]
    assert row.state is CheckState.OK, row
