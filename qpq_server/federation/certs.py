"""Federation certificates: a CA, per-domain certificates it signs, and the checks a
server runs on a peer's certificate. The one place they are built: `qpq-server
federation init-ca/issue-cert` and `qpq-ops rotate federation` both call `new_ca` and
`new_leaf`.

Files are DER as DESIGN.md names them (`federation-ca.der`, `federation-cert.der`,
`federation-key.der`); the loaders also read PEM (and PEM bundles of several CAs),
which is what `qpq-ops rotate federation` writes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qpq_server.errors import ConfigError
from qpq_server.tls import write_private_file

__all__ = ["CA_CERT", "CA_KEY", "CERT", "KEY", "Refusal", "certificate_domain", "check_domain",
           "init_ca", "issue_cert", "load_certificates", "load_private_key", "new_ca",
           "new_leaf", "verify_peer_certificate"]

CA_CERT = "federation-ca.der"
CA_KEY = "federation-ca-key.der"
CERT = "federation-cert.der"
KEY = "federation-key.der"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _refuse_existing(*paths: Path) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise ConfigError(f"refusing to overwrite {', '.join(existing)}; remove it first or "
                          "choose another --out")


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_private_file(path, key.private_bytes(serialization.Encoding.DER,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))


def new_ca(name: str = "qpq federation", days: int = 3650,
           now: dt.datetime | None = None,
           ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new federation CA certificate and its key (nothing written)."""
    key = ec.generate_private_key(ec.SECP256R1())
    # A name of its own (and key identifiers below): while peers trust the old and the
    # new CA side by side, a verifier must be able to tell which one issued a cert.
    serial = x509.random_serial_number()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            f"{name} CA {serial % 16**8:08x}")])
    now = now or _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def check_domain(domain: str) -> None:
    if not domain or any(c in domain for c in " @/:") or len(domain) > 253:
        raise ConfigError(f"--domain {domain!r} is not a domain name")


def new_leaf(domain: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
             days: int = 365, not_before: dt.datetime | None = None,
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A key and certificate for `domain` signed by `ca` (serverAuth and clientAuth:
    both ends of a federation link present it), never outliving the CA."""
    check_domain(domain)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - dt.timedelta(minutes=5)
    not_after = min(start + dt.timedelta(days=days), ca.not_valid_after_utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def init_ca(out: Path, name: str = "qpq federation", days: int = 3650) -> list[Path]:
    """A new federation CA in `out`: its certificate (0644) and its key (0600)."""
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    _refuse_existing(cert_path, key_path)
    cert, key = new_ca(name, days)
    _write_key(key_path, key)
    write_private_file(cert_path, cert.public_bytes(serialization.Encoding.DER), 0o644)
    return [cert_path, key_path]


def issue_cert(ca_dir: Path, domain: str, out: Path, days: int = 365,
               not_before: dt.datetime | None = None) -> list[Path]:
    """`new_leaf` for the CA in `ca_dir`, written to `out`."""
    check_domain(domain)
    ca_cert_path, ca_key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    if not ca_cert_path.is_file() or not ca_key_path.is_file():
        raise ConfigError(f"no federation CA in {ca_dir} (needs {CA_CERT} and {CA_KEY}; "
                          "make one with `qpq-server federation init-ca --out DIR`)")
    cert_path, key_path = out / CERT, out / KEY
    _refuse_existing(cert_path, key_path)
    cert, key = new_leaf(domain, load_certificates(ca_cert_path)[0],
                         load_private_key(ca_key_path), days, not_before)
    _write_key(key_path, key)
    write_private_file(cert_path, cert.public_bytes(serialization.Encoding.DER), 0o644)
    return [cert_path, key_path]


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate in a DER file or a PEM file/bundle."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read certificate {path}: {exc.strerror}") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise ConfigError(f"{path} is not an X.509 certificate (DER or PEM)") from None


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key {path}: {exc.strerror}") from None
    try:
        key = (serialization.load_pem_private_key(data, None) if b"-----BEGIN" in data
               else serialization.load_der_private_key(data, None))
    except (ValueError, TypeError):
        raise ConfigError(f"{path} is not an unencrypted private key (DER or PEM)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path}: federation keys must be EC keys")
    return key


def certificate_domain(cert: x509.Certificate) -> str | None:
    """The one DNS name a federation certificate is for."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    names = san.value.get_values_for_type(x509.DNSName)
    return names[0].lower() if len(names) == 1 else None


@dataclass(frozen=True)
class Refusal(Exception):
    """Why a peer certificate was refused; `reason` is the metric label."""

    reason: str
    detail: str

    def __str__(self) -> str:
        return self.detail


def verify_peer_certificate(cert: x509.Certificate, cas: list[x509.Certificate],
                            now: dt.datetime | None = None) -> str:
    """Check `cert` was issued by one of `cas` and is valid now; return its domain.
    Raise Refusal(other_ca | expired | bad_certificate)."""
    now = now or _now()
    # Several CAs may share a subject (a rotated CA beside its successor in a bundle):
    # the issuer is the one whose key verifies the signature.
    issuer = None
    for ca in cas:
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        issuer = ca
        break
    if issuer is None:
        raise Refusal("other_ca", "certificate not issued by the federation CA")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise Refusal("expired", "certificate is expired or not yet valid")
    if not issuer.not_valid_before_utc <= now <= issuer.not_valid_after_utc:
        raise Refusal("expired", "the federation CA certificate is expired")
    domain = certificate_domain(cert)
    if domain is None:
        raise Refusal("bad_certificate", "certificate names no single DNS domain")
    return domain
