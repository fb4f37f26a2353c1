"""`rotate session-key`: a new key for signing session tokens; every session ends.

Sessions are MAC-signed tokens any worker verifies with this key, so replacing it (and
reloading the server) voids every session at once: the answer to a leaked key or a
suspected mass session theft. Users log in again; nothing else changes.
"""

from __future__ import annotations

import secrets as key_source
import time
from collections.abc import Callable

from qpq_ops.backup.manifest import fingerprint
from qpq_ops.deployment import Deployment
from qpq_ops.errors import Refused
from qpq_ops.ownership import give_to, owner_of
from qpq_ops.rotate.audit import AuditRecord, append_audit
from qpq_ops.rotate.result import RotationResult
from qpq_ops.server_process import reload_server
from qpq_server.datadir import session_key_path
from qpq_server.secrets import Secret
from qpq_server.tls import write_private_file

__all__ = ["rotate_session_key"]

KIND = "session-key"


def rotate_session_key(dep: Deployment, *, dry_run: bool, reload_command: str | None = None,
                       now: Callable[[], float] = time.time) -> RotationResult:
    path = session_key_path(dep.data_dir)
    try:
        current = path.read_bytes()
    except OSError as exc:
        raise Refused(f"cannot read the session key {path}: {exc.strerror}") from None
    steps = (f"write a new random 256-bit session key to {path} (0600)",
             "reload the server (SIGHUP via its pid file, or --reload-command): every "
             "session signed with the old key stops working",
             "record the rotation in the audit log")
    previous = fingerprint(Secret(current.hex()))
    if dry_run:
        return RotationResult(KIND, "rotate", True, previous_fingerprint=previous,
                              steps=steps)
    new = key_source.token_bytes(32)
    write_private_file(path, new)
    give_to([path], owner_of(dep.data_dir))
    reload = reload_server(dep.config, reload_command)
    record = append_audit(dep.data_dir, AuditRecord(
        KIND, "rotate", now(), fingerprint(Secret(new.hex())), previous,
        {"reload": reload.how}))
    return RotationResult(
        KIND, "rotate", False, record.fingerprint, record.previous_fingerprint, steps,
        ("every user logs in again (qpq-client does so by itself when QPQ_PASSWORD is set)",
         "on several nodes, copy the new key to each node's data dir and reload each"),
        reload.how)
