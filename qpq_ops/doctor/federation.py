"""Doctor's federation checks: our federation certificate, then each peer's reachability.

Run only when `[federation] enabled = true`. The certificate check reads the files the
config names (`federation_cert`, `federation_key`, `federation_ca`; DER as
`qpq-server federation issue-cert` writes them, or PEM as `qpq-ops rotate federation`
may): each must be present and parse, the certificate must be signed by the federation
CA, valid now, not within the TLS expiry warning of `qpq_ops.triggers`, name our
`[federation] domain`, and belong to the key. Each `[[federation.peers]]` entry with an
address gets a reachability check: one QUIC handshake attempt over UDP, bounded by the
doctor's timeout; any answer of the peer (even a refusal) proves the path is open.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from qpq_ops.doctor.model import CheckResult, CheckState
from qpq_ops.triggers import TLS_EXPIRY_CRITICAL_S, TLS_EXPIRY_WARNING_S
from qpq_server.config import Config, FederationPeer, parse_hostport

__all__ = ["FEDERATION_ALPN", "Reachability", "certificate_result", "federation_results",
           "peer_result", "probe_peer"]

FEDERATION_ALPN = "qpq-fed/1"
"""The federation listener's ALPN (distinct from the client protocol's `qpq/1`)."""
DAY = 86_400.0


def _load_cert(path: Path) -> x509.Certificate:
    """The first certificate of a DER or PEM file; ValueError/OSError otherwise."""
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificates(data)[0]
    return x509.load_der_x509_certificate(data)


def _load_cas(path: Path) -> list[x509.Certificate]:
    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificates(data)  # a bundle during CA rotation
    return [x509.load_der_x509_certificate(data)]


def _load_key_public_der(path: Path) -> bytes:
    data = path.read_bytes()
    key = (serialization.load_pem_private_key(data, None) if b"-----BEGIN" in data
           else serialization.load_der_private_key(data, None))
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def _domains(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [name.lower() for name in san.value.get_values_for_type(x509.DNSName)]


def _signed_by(cert: x509.Certificate, cas: list[x509.Certificate]) -> bool:
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def certificate_result(config: Config, config_path: Path, now: float) -> CheckResult:
    """Our federation certificate: files, CA signature, validity window, domain, key."""
    check_id, title = "federation_cert", "Federation certificate"
    fed = config.federation
    fix = f"qpq-ops rotate federation --config {config_path}"
    paths: dict[str, Path] = {}
    for label, value in (("federation_cert", fed.federation_cert),
                         ("federation_key", fed.federation_key),
                         ("federation_ca", fed.federation_ca)):
        if not value:
            return CheckResult(check_id, title, CheckState.CRITICAL,
                               f"[federation] {label} is not set", fix)
        paths[label] = config.path(value)
    try:
        cert = _load_cert(paths["federation_cert"])
        cas = _load_cas(paths["federation_ca"])
        key_public = _load_key_public_der(paths["federation_key"])
    except OSError as exc:
        return CheckResult(check_id, title, CheckState.CRITICAL,
                           f"cannot read {exc.filename}: {exc.strerror}", fix)
    except (ValueError, TypeError) as exc:
        return CheckResult(check_id, title, CheckState.CRITICAL,
                           f"a federation file does not parse: {str(exc).splitlines()[0]}",
                           fix)
    where = paths["federation_cert"]
    if not _signed_by(cert, cas):
        return CheckResult(check_id, title, CheckState.CRITICAL,
                           f"{where} is not signed by the federation CA "
                           f"{paths['federation_ca']}: peers refuse it", fix)
    public = cert.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    if public != key_public:
        return CheckResult(check_id, title, CheckState.CRITICAL,
                           f"{where} does not belong to {paths['federation_key']}", fix)
    domains = _domains(cert)
    if fed.domain.lower() not in domains:
        return CheckResult(check_id, title, CheckState.CRITICAL,
                           f"{where} names {', '.join(domains) or 'no domain'}, not our "
                           f"domain {fed.domain!r}: peers refuse it", fix)
    not_before = cert.not_valid_before_utc.timestamp()
    not_after = cert.not_valid_after_utc.timestamp()
    days = (not_after - now) / DAY
    when = datetime.fromtimestamp(not_after, UTC).strftime("%Y-%m-%d %H:%M UTC")
    if now < not_before:
        return CheckResult(check_id, title, CheckState.CRITICAL,
                           f"{where} is not valid before "
                           f"{datetime.fromtimestamp(not_before, UTC):%Y-%m-%d %H:%M UTC}",
                           fix, days)
    if days < 0:
        return CheckResult(check_id, title, CheckState.CRITICAL,
                           f"{where} expired {-days:.1f} days ago ({when})", fix, days)
    detail = f"{where} for {fed.domain} expires in {days:.1f} days ({when})"
    if days * DAY < TLS_EXPIRY_CRITICAL_S:
        return CheckResult(check_id, title, CheckState.CRITICAL, detail, fix, days)
    if days * DAY < TLS_EXPIRY_WARNING_S:
        return CheckResult(check_id, title, CheckState.WARNING, detail, fix, days)
    return CheckResult(check_id, title, CheckState.OK, detail, value=days)


@dataclass(frozen=True)
class Reachability:
    reachable: bool
    detail: str
    seconds: float
    certificate_refused: bool = False
    """It answered, but its certificate failed our check (CA, validity, domain)."""


# TLS alerts our side raises on a bad peer certificate, as QUIC CRYPTO_ERROR (0x100 + alert)
_BAD_CERTIFICATE_CODES = {0x100 + alert for alert in (42, 43, 44, 45, 46, 48)}


def probe_peer(host: str, port: int, server_name: str, timeout: float,
               ca_pem: bytes | None = None) -> Reachability:
    """One QUIC handshake attempt to `host:port` within `timeout` seconds.

    Any answer proves the peer's listener answers over this path: a completed handshake,
    or a refusal (wrong ALPN). No answer in time means the address, the firewall or the
    peer is down. With `ca_pem` (the federation CA) the peer's certificate must also be
    signed by it, valid now and name `server_name`, as the relay requires; a failure is
    reachable but `certificate_refused`.
    """
    # Imported here: the ops CLI must not load a QUIC stack until a peer is probed.
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted

    started = time.monotonic()
    deadline = started + timeout
    configuration = QuicConfiguration(is_client=True, alpn_protocols=[FEDERATION_ALPN],
                                      server_name=server_name)
    if ca_pem is None:
        configuration.verify_mode = 0  # ssl.CERT_NONE: reachability only
    else:
        configuration.verify_mode = 2  # ssl.CERT_REQUIRED
        configuration.cadata = ca_pem
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        return Reachability(False, f"cannot resolve {host}: {exc.strerror or exc}", 0.0)
    family, _, _, _, address = infos[0]
    connection = QuicConnection(configuration=configuration)
    answered = False
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        connection.connect(address, now=time.monotonic())
        while True:
            # the events of what the last datagram or timer did to the connection
            event = connection.next_event()
            while event is not None:
                elapsed = time.monotonic() - started
                if isinstance(event, HandshakeCompleted):
                    connection.close()
                    for data, addr in connection.datagrams_to_send(now=time.monotonic()):
                        sock.sendto(data, addr)
                    checked = ("; certificate signed by the federation CA for "
                               f"{server_name}" if ca_pem is not None else "")
                    return Reachability(True, f"QUIC handshake completed in "
                                        f"{elapsed * 1000:.0f} ms{checked}", elapsed)
                if isinstance(event, ConnectionTerminated):
                    if not answered:
                        break  # our own give-up (no answer): reported below
                    why = event.reason_phrase or f"error {event.error_code}"
                    if ca_pem is not None and event.error_code in _BAD_CERTIFICATE_CODES:
                        return Reachability(True, f"answered, but its certificate is "
                                            f"refused: {why}", elapsed, True)
                    return Reachability(True, "answered and closed the handshake "
                                        f"({why})", elapsed)
                event = connection.next_event()
            now = time.monotonic()
            try:
                for data, addr in connection.datagrams_to_send(now=now):
                    sock.sendto(data, addr)
            except OSError as exc:  # e.g. no route to host
                return Reachability(False, f"cannot send to {host}:{port}: "
                                    f"{exc.strerror or exc}", now - started)
            if now >= deadline:
                break
            timer = connection.get_timer()
            if timer is not None and timer <= now:
                connection.handle_timer(now=now)
                continue
            sock.settimeout(min(deadline, timer if timer is not None else deadline) - now)
            try:
                data, addr = sock.recvfrom(65536)
            except TimeoutError:
                continue
            except ConnectionRefusedError:
                # ICMP port unreachable: the host answers, nothing listens on the port
                return Reachability(False, f"nothing listens on UDP {host}:{port}",
                                    time.monotonic() - started)
            answered = True
            connection.receive_datagram(data, addr, now=time.monotonic())
    if answered:
        return Reachability(True, "answered, handshake unfinished within "
                            f"{timeout:g} s", timeout)
    return Reachability(False, f"no QUIC answer within {timeout:g} s", timeout)


def peer_result(peer: FederationPeer, config_path: Path, timeout: float,
                ca_pem: bytes | None = None) -> CheckResult:
    check_id, title = f"federation_peer:{peer.domain}", f"Federation peer {peer.domain}"
    if not peer.address:
        return CheckResult(check_id, title, CheckState.SKIPPED,
                           "no address configured: the peer connects to us, we cannot "
                           "probe it")
    try:
        host, port = parse_hostport(peer.address)
    except ValueError as exc:  # the config check reports the same problem
        return CheckResult(check_id, title, CheckState.CRITICAL, f"address {exc}",
                           f"fix [[federation.peers]] address in {config_path}")
    result = probe_peer(host, port, peer.domain, timeout, ca_pem)
    if result.certificate_refused:
        return CheckResult(
            check_id, title, CheckState.CRITICAL, f"{peer.address}: {result.detail}",
            f"relays to {peer.domain} fail: its operator must present a certificate of "
            "the federation CA for their domain (qpq-ops rotate federation)",
            result.seconds)
    if result.reachable:
        return CheckResult(check_id, title, CheckState.OK,
                           f"{peer.address}: {result.detail}", value=result.seconds)
    return CheckResult(
        check_id, title, CheckState.CRITICAL, f"{peer.address}: {result.detail}",
        f"check that {peer.domain}'s qpq-server runs with federation enabled, that UDP "
        f"{port} is open on both firewalls and that the address in {config_path} is right",
        result.seconds,
    )


def federation_results(config: Config, config_path: Path, now: float,
                       timeout: float) -> list[CheckResult]:
    """Our certificate, then each peer in config order; nothing when federation is off."""
    if not config.federation.enabled:
        return []
    results = [certificate_result(config, config_path, now)]
    ca_pem = _ca_pem(config)
    results += [peer_result(peer, config_path, timeout, ca_pem)
                for peer in config.federation.peers]
    return results


def _ca_pem(config: Config) -> bytes | None:
    """The federation CA(s) as PEM, to judge peers' certificates; None if unreadable
    (the certificate row says why; peers are then probed for reachability only)."""
    value = config.federation.federation_ca
    if not value:
        return None
    try:
        cas = _load_cas(config.path(value))
    except (OSError, ValueError):
        return None
    return b"".join(ca.public_bytes(serialization.Encoding.PEM) for ca in cas)
