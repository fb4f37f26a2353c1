"""The rotation audit log: `DATA_DIR/audit/rotations.jsonl`, one JSON object per line.

Each record says what was rotated, when, by whom, and the fingerprints of the new and
previous secret; never a secret itself. Appended with O_APPEND and fsync'd, so records
are never rewritten and survive a crash right after the rotation.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qpq_ops.ownership import give_to, owner_of

__all__ = ["AuditRecord", "append_audit", "audit_path", "read_audit"]


def audit_path(data_dir: Path) -> Path:
    return data_dir / "audit" / "rotations.jsonl"


@dataclass(frozen=True)
class AuditRecord:
    kind: str                 # auth-token | tls | federation | db-key | opaque
    action: str               # rotate | finish | retire
    unix: float
    fingerprint: str = ""
    previous_fingerprint: str = ""
    details: dict[str, str] = field(default_factory=dict)
    time: str = ""
    user: str = ""
    host: str = ""


def _user() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    sudo = os.environ.get("SUDO_USER")
    return f"{user} (sudo by {sudo})" if sudo and sudo != user else user


def append_audit(data_dir: Path, record: AuditRecord) -> AuditRecord:
    stamped = AuditRecord(
        **{**asdict(record),
           "time": dt.datetime.fromtimestamp(record.unix, dt.UTC).isoformat(),
           "user": _user(), "host": socket.gethostname()})
    path = audit_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fresh = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(asdict(stamped), sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    if fresh:
        give_to([path.parent], owner_of(data_dir))
    return stamped


def read_audit(data_dir: Path) -> list[AuditRecord]:
    path = audit_path(data_dir)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(AuditRecord(**json.loads(line)))
        except (ValueError, TypeError):
            continue  # a torn last line after a crash: skip, keep the rest
    return records
