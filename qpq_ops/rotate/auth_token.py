"""`rotate auth-token`: a new access token, the old one accepted for a grace period.

Start: `.env` gets `QPQ_AUTH_TOKEN=<new>` and `QPQ_AUTH_TOKEN_PREVIOUS=<old>`, the
server reloads (it accepts both). `--finish` after the grace period drops the old one and
reloads again. The grace period's end is read back from the audit log.
"""

from __future__ import annotations

import datetime as dt
import secrets as token_source
import time
from collections.abc import Callable

from qpq_ops.backup.manifest import fingerprint
from qpq_ops.deployment import Deployment
from qpq_ops.errors import Refused
from qpq_ops.ownership import give_to, owner_of
from qpq_ops.rotate.audit import AuditRecord, append_audit, read_audit
from qpq_ops.rotate.env_override import override_warnings
from qpq_ops.rotate.result import RotationResult
from qpq_ops.server_process import reload_server
from qpq_server.secrets import Secret, read_env_file, write_env_file

__all__ = ["DEFAULT_GRACE_S", "finish_auth_token", "rotate_auth_token"]

DEFAULT_GRACE_S = 24 * 3600
KIND = "auth-token"


def _iso(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def rotate_auth_token(dep: Deployment, *, dry_run: bool, grace_s: float = DEFAULT_GRACE_S,
                      reload_command: str | None = None, new_token: Secret | None = None,
                      now: Callable[[], float] = time.time) -> RotationResult:
    """Rotate to `new_token` when given (one token for every node of a cluster), else to a
    fresh random one."""
    values = read_env_file(dep.env_file)
    current = values.get("QPQ_AUTH_TOKEN", "")
    if not current:
        raise Refused(f"no QPQ_AUTH_TOKEN in {dep.env_file}; nothing to rotate")
    if values.get("QPQ_AUTH_TOKEN_PREVIOUS"):
        raise Refused("a token rotation is already in progress (QPQ_AUTH_TOKEN_PREVIOUS is "
                      "set); run `qpq-ops rotate auth-token --finish` first")
    new = token_source.token_urlsafe(32) if new_token is None else new_token.reveal()
    if new == current:
        raise Refused("the new token is the one in use; give a different one")
    grace_until = now() + grace_s
    steps = (f"write a new QPQ_AUTH_TOKEN to {dep.env_file}, keep the old one as "
             "QPQ_AUTH_TOKEN_PREVIOUS (both accepted)",
             "reload the server (SIGHUP via its pid file, or --reload-command)",
             f"record the rotation in the audit log (grace period until {_iso(grace_until)})")
    warnings = tuple(override_warnings(dep.config, "QPQ_AUTH_TOKEN"))
    if dry_run:
        return RotationResult(KIND, "rotate", True, previous_fingerprint=fingerprint(
            Secret(current)), steps=steps, warnings=warnings)
    values["QPQ_AUTH_TOKEN"] = new
    values["QPQ_AUTH_TOKEN_PREVIOUS"] = current
    write_env_file(dep.env_file, values)
    give_to([dep.env_file], owner_of(dep.data_dir))
    reload = reload_server(dep.config, reload_command)
    record = append_audit(dep.data_dir, AuditRecord(
        KIND, "rotate", now(), fingerprint(Secret(new)), fingerprint(Secret(current)),
        {"grace_until_unix": f"{grace_until:.0f}", "reload": reload.how}))
    return RotationResult(
        KIND, "rotate", False, record.fingerprint, record.previous_fingerprint, steps,
        (f"give clients the new token (QPQ_AUTH_TOKEN in {dep.env_file}; never on a "
         "command line)",
         f"after {_iso(grace_until)} run `qpq-ops rotate auth-token --finish --config "
         f"{dep.config_path}` to stop accepting the old token"),
        reload.how, warnings)


def _grace_until(dep: Deployment) -> float | None:
    for record in reversed(read_audit(dep.data_dir)):
        if record.kind == KIND and record.action == "rotate":
            return float(record.details.get("grace_until_unix", "0"))
    return None


def finish_auth_token(dep: Deployment, *, dry_run: bool, force: bool = False,
                      reload_command: str | None = None,
                      now: Callable[[], float] = time.time) -> RotationResult:
    values = read_env_file(dep.env_file)
    previous = values.get("QPQ_AUTH_TOKEN_PREVIOUS", "")
    if not previous:
        raise Refused("no token rotation in progress (QPQ_AUTH_TOKEN_PREVIOUS is not set)")
    until = _grace_until(dep)
    if until is not None and now() < until and not force:
        raise Refused(f"the grace period runs until {_iso(until)}; clients still on the old "
                      "token would be cut off. Wait, or pass --force")
    steps = (f"remove QPQ_AUTH_TOKEN_PREVIOUS from {dep.env_file}",
             "reload the server: the old token is refused from now on")
    if dry_run:
        return RotationResult(KIND, "finish", True,
                              previous_fingerprint=fingerprint(Secret(previous)), steps=steps)
    del values["QPQ_AUTH_TOKEN_PREVIOUS"]
    write_env_file(dep.env_file, values)
    give_to([dep.env_file], owner_of(dep.data_dir))
    reload = reload_server(dep.config, reload_command)
    record = append_audit(dep.data_dir, AuditRecord(
        KIND, "finish", now(), fingerprint(Secret(values["QPQ_AUTH_TOKEN"])),
        fingerprint(Secret(previous)), {"reload": reload.how}))
    return RotationResult(KIND, "finish", False, record.fingerprint,
                          record.previous_fingerprint, steps, (), reload.how)
