"""`rotate opaque`: add a new OPAQUE server setup; `--finish` retires unused old ones.

The server loads every `opaque/setup-vN.bin` at start, registers new accounts under the
highest N, logs existing accounts in under their own version, and the client moves its
record to the current version after its next successful login. So rotating never locks
anybody out; an old setup may be retired once no account uses it. Retired setups are
moved to `opaque/retired/` (never deleted). The server only picks up setup changes at a
restart (`--restart-command`, else the operator restarts it).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from qpq_ops.backup.database import open_db
from qpq_ops.backup.filestore import store_problems
from qpq_ops.deployment import Deployment
from qpq_ops.errors import OpsError, Refused
from qpq_ops.ownership import give_to, owner_of
from qpq_ops.rotate.audit import AuditRecord, append_audit
from qpq_ops.rotate.result import RotationResult
from qpq_ops.server_process import running_pid
from qpq_server.auth.opaque import create_setup

__all__ = ["finish_opaque", "rotate_opaque", "setup_versions"]

KIND = "opaque"
_SETUP = re.compile(r"^setup-v(\d+)\.bin\Z")


def setup_versions(opaque_dir: Path) -> list[int]:
    if not opaque_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in opaque_dir.iterdir() if (m := _SETUP.match(p.name)))


def _fp(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _restart(dep: Deployment, command: str | None) -> str:
    if command:
        result = subprocess.run(shlex.split(command), capture_output=True, text=True,
                                timeout=120, check=False)
        if result.returncode != 0:
            raise OpsError(f"restart command {command!r} failed ({result.returncode})")
        return f"restarted with: {command}"
    if running_pid(dep.config) is not None:
        return "server running: restart it (systemctl restart qpq-server) to load the setup"
    return "server not running: the setup is loaded at its next start"


def rotate_opaque(dep: Deployment, *, dry_run: bool, restart_command: str | None = None,
                  now: Callable[[], float] = time.time) -> RotationResult:
    directory = dep.data_dir / "opaque"
    versions = setup_versions(directory)
    if not versions:
        raise Refused(f"no OPAQUE setup in {directory}; run qpq-server init first")
    new = versions[-1] + 1
    steps = (f"write opaque/setup-v{new}.bin and dummy-v{new}.bin (v{versions[-1]} and "
             "older stay, so existing accounts still log in)",
             "restart the server so it loads the new setup")
    next_steps = (f"new accounts register under v{new}; existing ones move to v{new} at "
                  "their next successful login (automatic, nothing for users to do)",
                  f"later, `qpq-ops rotate opaque --finish --config {dep.config_path}` "
                  "retires setups no account uses any more")
    if dry_run:
        return RotationResult(KIND, "rotate", True, "",
                              _fp(directory / f"setup-v{versions[-1]}.bin"), steps, next_steps)
    create_setup(directory, new)
    give_to([directory], owner_of(dep.data_dir))
    record = append_audit(dep.data_dir, AuditRecord(
        KIND, "rotate", now(), _fp(directory / f"setup-v{new}.bin"),
        _fp(directory / f"setup-v{versions[-1]}.bin"), {"version": str(new)}))
    return RotationResult(KIND, "rotate", False, record.fingerprint,
                          record.previous_fingerprint, steps, next_steps,
                          _restart(dep, restart_command))


def _accounts_per_setup(dep: Deployment) -> dict[int, int]:
    if dep.config.storage.backend == "file":
        _read, _problems, per_setup = store_problems(dep.config.file_store_dir)
        return per_setup
    db_key = dep.db_key()
    if db_key is None:
        raise Refused(f"QPQ_DB_KEY is not set (environment or {dep.env_file})")
    conn = open_db(dep.db_path, db_key)  # a WAL reader: fine beside a running server
    try:
        return {int(v): int(n) for v, n in conn.execute(
            "SELECT setup_version, count(*) FROM accounts GROUP BY setup_version")}
    finally:
        conn.close()


def finish_opaque(dep: Deployment, *, dry_run: bool, restart_command: str | None = None,
                  now: Callable[[], float] = time.time) -> RotationResult:
    directory = dep.data_dir / "opaque"
    versions = setup_versions(directory)
    if len(versions) < 2:
        raise Refused("only one OPAQUE setup: nothing to retire")
    used = _accounts_per_setup(dep)
    current = versions[-1]
    retire = [v for v in versions[:-1] if used.get(v, 0) == 0]
    waiting = {v: used[v] for v in versions[:-1] if used.get(v, 0)}
    steps = tuple(f"retire v{v} (no account uses it): move setup-v{v}.bin and dummy-v{v}.bin "
                  "to opaque/retired/" for v in retire)
    next_steps = tuple(f"{n} accounts still on v{v}: they move to v{current} at their next "
                       "login; run --finish again later" for v, n in sorted(waiting.items()))
    if dry_run or not retire:
        return RotationResult(KIND, "finish", dry_run, steps=steps, next_steps=next_steps)
    retired_dir = directory / "retired"
    retired_dir.mkdir(mode=0o700, exist_ok=True)
    for v in retire:
        for name in (f"setup-v{v}.bin", f"dummy-v{v}.bin"):
            if (directory / name).exists():
                os.replace(directory / name, retired_dir / name)
        append_audit(dep.data_dir, AuditRecord(KIND, "retire", now(),
                                               _fp(retired_dir / f"setup-v{v}.bin"),
                                               details={"version": str(v)}))
    give_to([retired_dir], owner_of(dep.data_dir))
    return RotationResult(KIND, "finish", False, steps=steps, next_steps=next_steps,
                          reload=_restart(dep, restart_command))
