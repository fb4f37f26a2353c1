"""`rotate federation`: a new federation key + certificate signed by the federation CA.

Paths come from `[federation] federation_cert / federation_key / federation_ca`, else
DESIGN.md's `DATA_DIR/federation-{cert,key,ca}.der`; the CA's private key sits beside
the CA certificate as `qpq-server federation init-ca` writes it (`federation-ca-key.der`
for `federation-ca.der`, `NAME-key.SUFFIX` in general). Files ending in `.der` are read
and written as DER (the layout of `qpq-server federation init-ca/issue-cert`), others as
PEM; either is read. Without a CA (or with `--new-ca`) a new CA is made first; the
previous CA stays in `NAME-bundle.pem` (new + previous: DER holds one certificate) so
both can be trusted during the switch, and the steps peers must take are returned.
Federation certificates carry both serverAuth and clientAuth: the link is mutual TLS.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import qpq_server.federation.certs as fed_certs
from qpq_ops.deployment import Deployment
from qpq_ops.errors import Refused
from qpq_ops.ownership import give_to, owner_of
from qpq_ops.rotate.audit import AuditRecord, append_audit
from qpq_ops.rotate.certs import cert_fingerprint, key_pem, pem
from qpq_ops.rotate.result import RotationResult
from qpq_server.errors import ConfigError
from qpq_server.tls import write_private_file

__all__ = ["FederationPaths", "federation_paths", "finish_federation", "rotate_federation"]

KIND = "federation"


@dataclass(frozen=True)
class FederationPaths:
    cert: Path
    key: Path
    ca: Path

    @property
    def ca_key(self) -> Path:
        """`federation-ca-key.der` beside `federation-ca.der` (init-ca's layout)."""
        return self.ca.with_name(f"{self.ca.stem}-key{self.ca.suffix}")

    @property
    def ca_bundle(self) -> Path:
        return self.ca.with_name(f"{self.ca.stem}-bundle.pem")


def federation_paths(dep: Deployment) -> FederationPaths:
    fed, cfg = dep.config.federation, dep.config
    base = dep.data_dir
    return FederationPaths(
        cfg.path(fed.federation_cert) if fed.federation_cert else base / "federation-cert.der",
        cfg.path(fed.federation_key) if fed.federation_key else base / "federation-key.der",
        cfg.path(fed.federation_ca) if fed.federation_ca else base / "federation-ca.der",
    )


def _is_der(path: Path) -> bool:
    return path.suffix.lower() == ".der"


def _cert_bytes(path: Path, cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER) if _is_der(path) else pem(cert)


def _key_bytes(path: Path, key: ec.EllipticCurvePrivateKey) -> bytes:
    if not _is_der(path):
        return key_pem(key)
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _read_cert(path: Path) -> x509.Certificate:
    """The (first) certificate of a DER or PEM file."""
    return fed_certs.load_certificates(path)[0]


def _load_ca(paths: FederationPaths,
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    if not paths.ca.is_file():
        return None
    if not paths.ca_key.is_file():
        raise Refused(f"the federation CA {paths.ca} exists but its key {paths.ca_key} does "
                      "not: sign a CSR with that CA yourself, or pass --new-ca")
    try:
        return _read_cert(paths.ca), fed_certs.load_private_key(paths.ca_key)
    except ConfigError as exc:
        raise Refused(f"cannot read the federation CA: {exc}") from None


def rotate_federation(dep: Deployment, *, dry_run: bool, new_ca: bool = False,
                      days: int = 365, ca_days: int = 3650,
                      now: Callable[[], float] = time.time) -> RotationResult:
    paths = federation_paths(dep)
    domain = dep.config.federation.domain or dep.config.server.domain
    moment = dt.datetime.fromtimestamp(now(), dt.UTC)
    existing_ca = None if new_ca else _load_ca(paths)
    make_ca = new_ca or existing_ca is None
    try:
        old_leaf = _read_cert(paths.cert) if paths.cert.is_file() else None
    except ConfigError:
        old_leaf = None  # unreadable: replaced all the same
    steps = []
    if make_ca:
        steps.append(f"create a new federation CA at {paths.ca} (key {paths.ca_key})")
    steps.append(f"issue a new federation key + certificate for {domain!r} at {paths.cert}")
    next_steps: list[str] = []
    if make_ca:
        next_steps += [
            f"send {paths.ca} (the CA certificate, never {paths.ca_key.name}) to the "
            "operator of "
            "every federation peer",
            "each peer adds it to its federation_ca trust (keep the previous CA there "
            f"until this node presents the new certificate; {paths.ca_bundle.name} holds "
            "both)",
            "peers reload or restart their federation listener",
            "once every peer trusts the new CA, remove the previous CA from their trust",
        ]
    else:
        next_steps.append("peers need do nothing: they already trust this CA")
    next_steps.append("reload qpq-server (SIGHUP, `systemctl reload qpq-server`) so its "
                      "federation listener presents the new certificate")
    if dry_run:
        return RotationResult(KIND, "rotate", True, "",
                              cert_fingerprint(old_leaf) if old_leaf else "", tuple(steps),
                              tuple(next_steps))
    if make_ca:
        ca_cert, ca_key = fed_certs.new_ca(f"qpq federation {domain}", ca_days, moment)
        old_ca = pem(_read_cert(paths.ca)) if paths.ca.is_file() else b""
        for path in (paths.ca, paths.ca_key):
            if path.is_file():
                write_private_file(path.with_name(path.name + ".previous"), path.read_bytes())
        write_private_file(paths.ca_key, _key_bytes(paths.ca_key, ca_key))
        write_private_file(paths.ca, _cert_bytes(paths.ca, ca_cert), 0o644)
        write_private_file(paths.ca_bundle, pem(ca_cert) + old_ca, 0o644)
    else:
        assert existing_ca is not None
        ca_cert, ca_key = existing_ca
    try:
        leaf, leaf_key = fed_certs.new_leaf(domain, ca_cert, ca_key, days,
                                  moment - dt.timedelta(minutes=5))
    except ConfigError as exc:
        raise Refused(f"[federation] domain: {exc}") from None
    leaf.verify_directly_issued_by(ca_cert)
    for path in (paths.cert, paths.key):
        if path.is_file():
            write_private_file(path.with_name(path.name + ".previous"), path.read_bytes())
    write_private_file(paths.key, _key_bytes(paths.key, leaf_key))
    write_private_file(paths.cert, _cert_bytes(paths.cert, leaf), 0o644)
    written = [paths.cert, paths.key, paths.ca, paths.ca_key, paths.ca_bundle]
    give_to([*written, *(p.with_name(p.name + ".previous") for p in written)],
            owner_of(dep.data_dir))
    record = append_audit(dep.data_dir, AuditRecord(
        KIND, "rotate", now(), cert_fingerprint(leaf),
        cert_fingerprint(old_leaf) if old_leaf else "",
        {"ca": cert_fingerprint(ca_cert), "new_ca": str(make_ca).lower(), "domain": domain}))
    return RotationResult(KIND, "rotate", False, record.fingerprint,
                          record.previous_fingerprint, tuple(steps), tuple(next_steps),
                          "not reloaded: restart the server to use the new certificate")


def finish_federation(dep: Deployment, *, dry_run: bool,
                      now: Callable[[], float] = time.time) -> RotationResult:
    """After every peer trusts the new CA and sees the new certificate: delete the
    previous keys and CA, and shrink the CA bundle to the current CA."""
    paths = federation_paths(dep)
    previous = [p.with_name(p.name + ".previous")
                for p in (paths.key, paths.cert, paths.ca_key, paths.ca)]
    present = [p for p in previous if p.exists()]
    if not present:
        raise Refused("no previous federation key or CA to drop (nothing to finish)")
    steps = tuple(f"delete {p}" for p in present)
    if paths.ca_bundle.exists() and paths.ca.is_file():
        steps += (f"rewrite {paths.ca_bundle} with the current CA only",)
    if dry_run:
        return RotationResult(KIND, "finish", True, steps=steps)
    for path in present:
        path.unlink()
    if paths.ca_bundle.exists() and paths.ca.is_file():
        write_private_file(paths.ca_bundle, pem(_read_cert(paths.ca)), 0o644)
        give_to([paths.ca_bundle], owner_of(dep.data_dir))
    current = _read_cert(paths.cert) if paths.cert.is_file() else None
    record = append_audit(dep.data_dir, AuditRecord(
        KIND, "finish", now(), cert_fingerprint(current) if current else "",
        details={"dropped": ", ".join(p.name for p in present)}))
    return RotationResult(KIND, "finish", False, record.fingerprint, steps=steps,
                          next_steps=("peers remove the previous CA from their trust",))
