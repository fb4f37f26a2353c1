"""`qpq_tls_pair_problem`: why a TLS certificate and key cannot serve a domain ("" if they can).

The preflight refuses a cluster certificate from the vault or the controller before anything
changes: a key that is not the certificate's, an expired certificate, or one whose names do
not cover the domain would otherwise only show when the nodes reload onto it. `cryptography`
is a dependency of ansible-core, so it is on every controller.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID


def _covers(pattern: str, domain: str) -> bool:
    pattern, domain = pattern.lower().rstrip("."), domain.lower().rstrip(".")
    if pattern.startswith("*."):  # a wildcard stands for exactly one leftmost label
        head, _, rest = domain.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == domain


def qpq_tls_pair_problem(cert_pem: Any, key_pem: Any, domain: str) -> str:
    try:
        cert = x509.load_pem_x509_certificate(str(cert_pem).encode())
    except ValueError:
        return "the certificate is not a PEM X.509 certificate"
    try:
        key = serialization.load_pem_private_key(str(key_pem).encode(), password=None)
    except (ValueError, TypeError):
        return "the key is not an unencrypted PEM private key"
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != \
            cert.public_key().public_bytes(encoding, public):
        return "the key does not belong to the certificate"
    # not_valid_after_utc from cryptography 42; older ones (Debian 12's) have the naive UTC one.
    expires = getattr(cert, "not_valid_after_utc", None) or \
        cert.not_valid_after.replace(tzinfo=dt.timezone.utc)
    if expires <= dt.datetime.now(dt.timezone.utc):
        return f"the certificate expired on {expires:%Y-%m-%d}"
    try:
        names = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if not any(_covers(name, domain) for name in names):
        return f"the certificate names {', '.join(names) or 'nothing'}, not {domain}"
    return ""


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"qpq_tls_pair_problem": qpq_tls_pair_problem}
