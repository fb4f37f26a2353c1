"""`rotate db-key`: re-encrypt the SQLCipher database under a new key (`PRAGMA rekey`).

The server must be stopped (or `--stop` stops it through its pid file). Sequence, built
so that no crash can leave a database whose key is nowhere on disk:
1. the current key must open the database, else abort with nothing changed;
2. a backup (with secrets, so it carries the key it needs) is made and verified;
3. `.env` gets `QPQ_DB_KEY_NEXT=<new>` beside the unchanged `QPQ_DB_KEY` (atomic);
4. WAL checkpoint, `PRAGMA rekey`; the new key must open it and the old must not;
5. `.env` gets `QPQ_DB_KEY=<new>` and loses `QPQ_DB_KEY_NEXT` (atomic).
Rerunning after a crash between 3 and 5 finds `QPQ_DB_KEY_NEXT` and completes.
"""

from __future__ import annotations

import os
import secrets as key_source
import time
from collections.abc import Callable
from pathlib import Path

from qpq_ops.backup.create import BackupRequest, create_backup
from qpq_ops.backup.database import open_db
from qpq_ops.backup.manifest import fingerprint
from qpq_ops.backup.verify import verify_archive
from qpq_ops.deployment import Deployment
from qpq_ops.errors import OpsError, Refused, WrongKey
from qpq_ops.ownership import give_to, owner_of
from qpq_ops.rotate.audit import AuditRecord, append_audit
from qpq_ops.rotate.result import RotationResult
from qpq_ops.server_process import running_pid, stop_server
from qpq_server.secrets import Secret, read_env_file, write_env_file
from qpq_server.storage.sqlcipher import key_pragma

__all__ = ["NEXT_KEY", "rotate_db_key"]

KIND = "db-key"
NEXT_KEY = "QPQ_DB_KEY_NEXT"


def _opens(path: Path, key: Secret) -> bool:
    try:
        open_db(path, key).close()
    except WrongKey:
        return False
    return True


def _rekey(path: Path, old: Secret, new: Secret) -> None:
    conn = open_db(path, old)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute(key_pragma(new).replace("PRAGMA key", "PRAGMA rekey", 1))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def rotate_db_key(dep: Deployment, *, dry_run: bool, backup_dest: Path | None = None,
                  stop: bool = False, now: Callable[[], float] = time.time) -> RotationResult:
    if dep.config.storage.backend != "sqlcipher":
        raise Refused(f"the {dep.config.storage.backend!r} storage backend has no SQLCipher "
                      "database to re-key")
    if os.environ.get("QPQ_DB_KEY"):
        raise Refused("QPQ_DB_KEY is set in the environment; this rotation rewrites the .env "
                      f"({dep.env_file}): unset it here and in the server's environment first")
    values = read_env_file(dep.env_file)
    current_value = values.get("QPQ_DB_KEY", "")
    if not current_value:
        raise Refused(f"no QPQ_DB_KEY in {dep.env_file}")
    current = Secret(current_value)
    db = dep.db_path
    pending = Secret(values[NEXT_KEY]) if values.get(NEXT_KEY) else None
    dest = backup_dest or dep.data_dir / "pre-rotation-backups"
    steps: tuple[str, ...] = ("check that the current key opens the database (abort otherwise)",
             f"back up (with secrets) to {dest} and verify the archive",
             f"store the new key as {NEXT_KEY} in {dep.env_file}",
             "PRAGMA rekey; check the new key opens the database and the old one does not",
             f"make the new key QPQ_DB_KEY in {dep.env_file}")
    pid = running_pid(dep.config)
    if pid is not None and not (stop and not dry_run):
        if not dry_run:
            raise Refused(f"qpq-server is running (pid {pid}); stop it first, or pass --stop "
                          "to stop it through its pid file")
        steps = (f"stop qpq-server (pid {pid})", *steps)
    if pending is not None and _opens(db, pending):
        # A previous run re-keyed but crashed before step 5: only finish it.
        if dry_run:
            return RotationResult(KIND, "rotate", True, fingerprint(pending),
                                  fingerprint(current), (steps[-1],))
        return _finalise(dep, values, pending, current, None, now)
    if not _opens(db, current):
        raise WrongKey(f"QPQ_DB_KEY in {dep.env_file} does not open {db}; nothing was changed")
    if dry_run:
        return RotationResult(KIND, "rotate", True, "", fingerprint(current), steps)
    if pid is not None:
        stop_server(dep.config)
    backup = create_backup(BackupRequest(dep, dest, include_secrets=True))
    report = verify_archive(backup.archive, current)
    if not report.ok or not report.database_checked:
        raise OpsError(f"the pre-rotation backup {backup.archive} did not verify "
                       f"({'; '.join(report.problems[:2])}); nothing was changed")
    new = pending or Secret(key_source.token_hex(32))
    values[NEXT_KEY] = new.reveal()
    write_env_file(dep.env_file, values)
    give_to([dep.env_file], owner_of(dep.data_dir))
    _rekey(db, current, new)
    if not _opens(db, new) or _opens(db, current):
        raise OpsError(f"after PRAGMA rekey the keys do not behave as expected; {dep.env_file}"
                       f" holds both (QPQ_DB_KEY old, {NEXT_KEY} new): rerun this command")
    return _finalise(dep, values, new, current, backup.archive, now)


def _finalise(dep: Deployment, values: dict[str, str], new: Secret, old: Secret,
              backup: Path | None, now: Callable[[], float]) -> RotationResult:
    values["QPQ_DB_KEY"] = new.reveal()
    values.pop(NEXT_KEY, None)
    write_env_file(dep.env_file, values)
    give_to([dep.env_file], owner_of(dep.data_dir))
    record = append_audit(dep.data_dir, AuditRecord(
        KIND, "rotate", now(), fingerprint(new), fingerprint(old),
        {"pre_rotation_backup": str(backup) if backup else "(made by the interrupted run)"}))
    next_steps = ["start qpq-server (systemctl start qpq-server): it reads the new key from "
                  f"{dep.env_file}"]
    if backup:
        next_steps.append(f"{backup} holds the OLD key (it must, to be restorable): move it "
                          "to secure storage and delete it once a new backup exists")
    return RotationResult(KIND, "rotate", False, record.fingerprint,
                          record.previous_fingerprint,
                          ("re-encrypted the database under a new key", "updated .env"),
                          tuple(next_steps), "server left stopped")
