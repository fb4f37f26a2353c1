"""`rotate tls`: a new serving key and certificate, then a reload that keeps connections.

Self-signed by default (same shape as `qpq-server init`), or `--cert/--key` installs a
provided pair after checking that they match and are valid now. The previous pair is kept
as `*.previous`; for self-signed certificates `tls/trust-bundle.pem` (new + previous)
lets clients trust both across the switch. The server's SIGHUP reload makes new
handshakes use the new certificate; established QUIC connections keep theirs.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from qpq_ops.backup.deployment import Deployment
from qpq_ops.backup.errors import Refused
from qpq_ops.backup.server_process import reload_server
from qpq_ops.rotate.audit import AuditRecord, append_audit
from qpq_ops.rotate.certs import CertPair, cert_fingerprint, key_pem, load_pair, pem
from qpq_ops.rotate.result import RotationResult
from qpq_server.tls import write_private_file, write_self_signed

__all__ = ["rotate_tls"]

KIND = "tls"


def _self_signed(domain: str, days: int) -> CertPair:
    with tempfile.TemporaryDirectory(prefix="qpq-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        write_self_signed(cert_path, key_path, domain, days)
        return load_pair(cert_path, key_path)


def _current_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def rotate_tls(dep: Deployment, *, dry_run: bool, cert: Path | None = None,
               key: Path | None = None, days: int = 365, reload_command: str | None = None,
               now: Callable[[], float] = time.time) -> RotationResult:
    if (cert is None) != (key is None):
        raise Refused("give both --cert and --key, or neither (self-signed)")
    cfg = dep.config
    domain = cfg.server.domain
    pair = load_pair(cert, key) if cert and key else _self_signed(domain, days)
    refusals, warnings = pair.problems(domain, dt.datetime.fromtimestamp(now(), dt.UTC))
    if refusals:
        raise Refused(f"not installing {cert}: " + "; ".join(refusals))
    old = _current_cert(cfg.tls_cert_path)
    self_signed = pair.leaf.issuer == pair.leaf.subject
    steps = [f"{'install the provided' if cert else 'generate a self-signed'} certificate "
             f"({cert_fingerprint(pair.leaf)}) and key",
             f"keep the previous pair as {cfg.tls_cert_path.name}.previous / "
             f"{cfg.tls_key_path.name}.previous",
             "reload the server (new handshakes get the new certificate, connections stay)"]
    bundle = cfg.tls_cert_path.with_name("trust-bundle.pem")
    if self_signed:
        steps.insert(2, f"write {bundle} (new + previous certificate) for clients")
    result = RotationResult(
        KIND, "rotate", dry_run, cert_fingerprint(pair.leaf),
        cert_fingerprint(old) if old else "", tuple(steps), warnings=tuple(warnings))
    if dry_run:
        return result
    for path in (cfg.tls_cert_path, cfg.tls_key_path):
        if path.is_file():
            write_private_file(path.with_name(path.name + ".previous"), path.read_bytes())
    # Key first, then certificate: the server reads both only on the SIGHUP below.
    write_private_file(cfg.tls_key_path, key_pem(pair.key))
    write_private_file(cfg.tls_cert_path, b"".join(pem(c) for c in pair.chain), 0o644)
    next_steps = ["established connections keep working; new connections verify the "
                  "new certificate"]
    if self_signed:
        write_private_file(bundle, pem(pair.leaf) + (pem(old) if old else b""), 0o644)
        next_steps.insert(0, f"clients that pin the certificate (qpq-client --ca) need "
                          f"{bundle} (trusts old and new) or the new {cfg.tls_cert_path.name}")
    reload = reload_server(cfg, reload_command)
    append_audit(dep.data_dir, AuditRecord(
        KIND, "rotate", now(), result.fingerprint, result.previous_fingerprint,
        {"source": "provided" if cert else "self-signed",
         "not_after": pair.leaf.not_valid_after_utc.isoformat(), "reload": reload.how}))
    return RotationResult(KIND, "rotate", False, result.fingerprint,
                          result.previous_fingerprint, result.steps, tuple(next_steps),
                          reload.how, result.warnings)
