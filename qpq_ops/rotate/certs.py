"""Certificate helpers shared by the TLS and federation rotations."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from qpq_ops.errors import Refused

__all__ = ["CertPair", "cert_fingerprint", "key_pem", "load_pair", "pem", "self_signed"]


def cert_fingerprint(cert: x509.Certificate) -> str:
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class CertPair:
    chain: tuple[x509.Certificate, ...]   # leaf first
    key: PrivateKeyTypes

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def problems(self, domain: str, now: dt.datetime) -> tuple[list[str], list[str]]:
        """(refusals, warnings) for installing this pair as a server certificate."""
        refusals, warnings = [], []
        leaf = self.leaf
        if leaf.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo,
        ) != self.key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
            refusals.append("the key does not match the certificate")
        if now < leaf.not_valid_before_utc:
            refusals.append(f"the certificate is not valid before {leaf.not_valid_before_utc}")
        if now >= leaf.not_valid_after_utc:
            refusals.append(f"the certificate expired on {leaf.not_valid_after_utc}")
        elif leaf.not_valid_after_utc - now < dt.timedelta(days=14):
            warnings.append(f"the certificate expires soon ({leaf.not_valid_after_utc})")
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = san.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            names = []
        if domain not in names:
            warnings.append(f"the certificate does not name {domain!r} "
                            f"(subjectAltName DNS: {names or 'none'})")
        return refusals, warnings


def load_pair(cert_path: Path, key_path: Path) -> CertPair:
    try:
        chain = tuple(x509.load_pem_x509_certificates(cert_path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise Refused(f"cannot read certificate {cert_path}: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise Refused(f"cannot read private key {key_path} (PEM, unencrypted): "
                      f"{type(exc).__name__}") from None
    return CertPair(chain, key)


def self_signed(domain: str, days: int, now: dt.datetime) -> CertPair:
    """Like `qpq-server init`'s certificate, but with a subject unique to this rotation
    and key identifiers: clients given a trust bundle of several self-signed certificates
    for the same domain must be able to tell them apart (OpenSSL looks issuers up by
    subject name, then key identifier)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, domain),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                           f"qpq {now.strftime('%Y%m%dT%H%M%S.%fZ')}"),
    ])
    alt: list[x509.GeneralName] = [x509.DNSName(domain)]
    if domain != "localhost":
        alt.append(x509.DNSName("localhost"))
    alt.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return CertPair((cert,), key)
