"""Backup, verify, list, prune and restore of a qpq deployment (`qpq-ops backup|restore`).

Modules, one job each: `layout` (what is archived and where it restores to), `database`
(SQLCipher snapshot and checks), `archive` (tar container), `manifest`, `create`,
`verify`, `catalog` (list/prune), `textfile` (node_exporter metric), `purge` (one-time key
packages), `restore`, `doctor` (post-restore checks). The deployment loader, the server's
pid file and file ownership are shared with rotation and live at the package level
(`qpq_ops.deployment`, `qpq_ops.server_process`, `qpq_ops.ownership`); errors are
`qpq_ops.errors`.
"""

from qpq_ops.backup.catalog import ArchiveInfo, PrunePlan, apply_prune, list_archives, plan_prune
from qpq_ops.backup.create import BackupRequest, BackupResult, create_backup
from qpq_ops.backup.doctor import DoctorCheck, DoctorReport, run_doctor
from qpq_ops.backup.manifest import Manifest, Member
from qpq_ops.backup.restore import RestoreRequest, RestoreResult, restore_archive, resume_restore
from qpq_ops.backup.verify import VerifyReport, verify_archive

__all__ = [
    "ArchiveInfo",
    "BackupRequest",
    "BackupResult",
    "DoctorCheck",
    "DoctorReport",
    "Manifest",
    "Member",
    "PrunePlan",
    "RestoreRequest",
    "RestoreResult",
    "VerifyReport",
    "apply_prune",
    "create_backup",
    "list_archives",
    "plan_prune",
    "restore_archive",
    "resume_restore",
    "run_doctor",
    "verify_archive",
]
