"""`rotate tls`: a new serving key and certificate, then a reload that keeps connections.

Self-signed by default (same shape as `qpq-server init`), or `--cert/--key` installs a
provided pair after checking that they match and are valid now. The previous pair is kept
as `*.previous`. New handshakes use the new certificate after the SIGHUP reload;
established QUIC connections keep theirs.

Clients that pin a self-signed certificate can be moved without a single failed
handshake in two steps: `--stage` makes the next pair (`tls/next-cert.pem`,
`next-key.pem`) and `tls/trust-bundle.pem` (current + next); once clients have the
bundle, a plain `rotate tls` installs the staged pair, which they already trust.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from qpq_ops.deployment import Deployment
from qpq_ops.errors import Refused
from qpq_ops.ownership import give_to, owner_of
from qpq_ops.rotate.audit import AuditRecord, append_audit
from qpq_ops.rotate.certs import CertPair, cert_fingerprint, key_pem, load_pair, pem
from qpq_ops.rotate.certs import self_signed as make_self_signed
from qpq_ops.rotate.result import RotationResult
from qpq_ops.server_process import reload_server
from qpq_server.tls import write_private_file

__all__ = ["TlsPaths", "finish_tls", "rotate_tls", "stage_tls"]

KIND = "tls"


@dataclass(frozen=True)
class TlsPaths:
    cert: Path
    key: Path

    @property
    def next_cert(self) -> Path:
        return self.cert.with_name("next-cert.pem")

    @property
    def next_key(self) -> Path:
        return self.cert.with_name("next-key.pem")

    @property
    def bundle(self) -> Path:
        return self.cert.with_name("trust-bundle.pem")


def _paths(dep: Deployment) -> TlsPaths:
    return TlsPaths(dep.config.tls_cert_path, dep.config.tls_key_path)


def _new_pair(dep: Deployment, days: int, now: float) -> CertPair:
    return make_self_signed(dep.config.server.domain, days, dt.datetime.fromtimestamp(now, dt.UTC))


def _current_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _checked(pair: CertPair, dep: Deployment, now: float, what: str) -> list[str]:
    refusals, warnings = pair.problems(dep.config.server.domain,
                                       dt.datetime.fromtimestamp(now, dt.UTC))
    if refusals:
        raise Refused(f"not installing {what}: " + "; ".join(refusals))
    return warnings


def stage_tls(dep: Deployment, *, dry_run: bool, days: int = 365,
              now: Callable[[], float] = time.time) -> RotationResult:
    """Make the next self-signed pair and a trust bundle (current + next); serve nothing new."""
    paths = _paths(dep)
    current = _current_cert(paths.cert)
    steps = (f"write the next pair to {paths.next_cert.name} / {paths.next_key.name}",
             f"write {paths.bundle} (current + next certificate)")
    next_steps = (f"give clients {paths.bundle} (qpq-client --ca): it trusts the current "
                  "and the next certificate",
                  f"once they have it: `qpq-ops rotate tls --config {dep.config_path}` "
                  "installs the staged pair; no client sees a failed handshake")
    if dry_run:
        return RotationResult(KIND, "stage", True, "",
                              cert_fingerprint(current) if current else "", steps, next_steps)
    pair = _new_pair(dep, days, now())
    warnings = _checked(pair, dep, now(), "the staged pair")
    write_private_file(paths.next_key, key_pem(pair.key))
    write_private_file(paths.next_cert, pem(pair.leaf), 0o644)
    write_private_file(paths.bundle, (pem(current) if current else b"") + pem(pair.leaf), 0o644)
    give_to([paths.next_key, paths.next_cert, paths.bundle], owner_of(dep.data_dir))
    record = append_audit(dep.data_dir, AuditRecord(
        KIND, "stage", now(), cert_fingerprint(pair.leaf),
        cert_fingerprint(current) if current else "",
        {"not_after": pair.leaf.not_valid_after_utc.isoformat()}))
    return RotationResult(KIND, "stage", False, record.fingerprint,
                          record.previous_fingerprint, steps, next_steps,
                          "nothing reloaded: the server still serves the current pair",
                          tuple(warnings))


def rotate_tls(dep: Deployment, *, dry_run: bool, cert: Path | None = None,
               key: Path | None = None, days: int = 365, reload_command: str | None = None,
               now: Callable[[], float] = time.time) -> RotationResult:
    if (cert is None) != (key is None):
        raise Refused("give both --cert and --key, or neither (self-signed)")
    paths = _paths(dep)
    staged = cert is None and paths.next_cert.is_file() and paths.next_key.is_file()
    if cert and key:
        pair, source = load_pair(cert, key), "provided"
    elif staged:
        pair, source = load_pair(paths.next_cert, paths.next_key), "staged"
    else:
        pair, source = _new_pair(dep, days, now()), "self-signed"
    warnings = _checked(pair, dep, now(), str(cert or paths.next_cert))
    old = _current_cert(paths.cert)
    self_signed = pair.leaf.issuer == pair.leaf.subject
    verb = {"provided": "install the provided", "staged": "install the staged",
            "self-signed": "generate and install a self-signed"}[source]
    steps = [f"{verb} certificate ({cert_fingerprint(pair.leaf)}) and key",
             f"keep the previous pair as {paths.cert.name}.previous / "
             f"{paths.key.name}.previous",
             "reload the server (new handshakes get the new certificate, connections stay)"]
    if self_signed:
        steps.insert(2, f"write {paths.bundle} (new + previous certificate) for clients")
    if dry_run:
        return RotationResult(KIND, "rotate", True, cert_fingerprint(pair.leaf),
                              cert_fingerprint(old) if old else "", tuple(steps),
                              warnings=tuple(warnings))
    for path in (paths.cert, paths.key):
        if path.is_file():
            write_private_file(path.with_name(path.name + ".previous"), path.read_bytes())
    # Key first, then certificate: the server reads both only on the SIGHUP below.
    write_private_file(paths.key, key_pem(pair.key))
    write_private_file(paths.cert, b"".join(pem(c) for c in pair.chain), 0o644)
    if staged:
        paths.next_key.unlink()
        paths.next_cert.unlink()
    next_steps = ["established connections keep working; new connections verify the "
                  "new certificate"]
    if self_signed:
        write_private_file(paths.bundle, pem(pair.leaf) + (pem(old) if old else b""), 0o644)
        if not staged:
            next_steps.insert(0, "clients that pin the certificate (qpq-client --ca) need "
                              f"the new {paths.cert.name} or {paths.bundle.name}; next time, "
                              "`rotate tls --stage` first avoids any failed handshake")
    give_to([paths.cert, paths.key, paths.bundle,
             *(p.with_name(p.name + ".previous") for p in (paths.cert, paths.key))],
            owner_of(dep.data_dir))
    reload = reload_server(dep.config, reload_command)
    record = append_audit(dep.data_dir, AuditRecord(
        KIND, "rotate", now(), cert_fingerprint(pair.leaf),
        cert_fingerprint(old) if old else "",
        {"source": source, "not_after": pair.leaf.not_valid_after_utc.isoformat(),
         "reload": reload.how}))
    return RotationResult(KIND, "rotate", False, record.fingerprint,
                          record.previous_fingerprint, tuple(steps), tuple(next_steps),
                          reload.how, tuple(warnings))


def finish_tls(dep: Deployment, *, dry_run: bool,
               now: Callable[[], float] = time.time) -> RotationResult:
    """After clients have the new certificate: delete the previous key (a rotated-away key
    is a liability, the more so if it was rotated because it leaked) and its certificate,
    and shrink the trust bundle to the current certificate."""
    paths = _paths(dep)
    previous = [p.with_name(p.name + ".previous") for p in (paths.key, paths.cert)]
    present = [p for p in previous if p.exists()]
    if not present:
        raise Refused("no previous TLS pair to drop (nothing to finish)")
    current = _current_cert(paths.cert)
    steps = tuple(f"delete {p}" for p in present) + (
        (f"rewrite {paths.bundle} with the current certificate only",)
        if paths.bundle.exists() and current else ())
    if dry_run:
        return RotationResult(KIND, "finish", True, steps=steps)
    for path in present:
        path.unlink()
    if paths.bundle.exists() and current:
        write_private_file(paths.bundle, pem(current), 0o644)
        give_to([paths.bundle], owner_of(dep.data_dir))
    record = append_audit(dep.data_dir, AuditRecord(
        KIND, "finish", now(), cert_fingerprint(current) if current else "",
        details={"dropped": ", ".join(p.name for p in present)}))
    return RotationResult(KIND, "finish", False, record.fingerprint, steps=steps)
