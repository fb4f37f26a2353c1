"""`backup create`: an online, consistent archive of a running (or stopped) server."""

from __future__ import annotations

import datetime as dt
import errno
import glob
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from qpq_ops.backup.age import AgeWriter
from qpq_ops.backup.archive import ArchiveWriter
from qpq_ops.backup.database import Snapshot, snapshot_database
from qpq_ops.backup.filestore import counts_from_members
from qpq_ops.backup.layout import DB_MEMBER, source_files
from qpq_ops.backup.manifest import (
    FORMAT,
    FORMAT_VERSION,
    Manifest,
    Member,
    archive_name,
    archive_prefix,
    fingerprint,
)
from qpq_ops.backup.pgdump import DUMP_MEMBER, dump_database
from qpq_ops.backup.textfile import write_backup_metrics
from qpq_ops.deployment import Deployment
from qpq_ops.errors import OpsError, Refused
from qpq_server import __version__ as server_version
from qpq_server.fsutil import fsync_dir
from qpq_server.secrets import Secret
from qpq_server.storage.migrations import SCHEMA_VERSION

__all__ = ["BackupRequest", "BackupResult", "create_backup", "planned_bytes"]

ProgressFn = Callable[[int], None]
_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


@dataclass(frozen=True)
class BackupRequest:
    deployment: Deployment
    dest: Path
    include_secrets: bool = False
    textfile_dir: Path | None = None  # None: do not write the metric
    recipients: tuple[X25519PublicKey, ...] = ()  # age recipients: encrypt the archive


@dataclass(frozen=True)
class BackupResult:
    archive: Path
    manifest: Manifest
    size_bytes: int
    duration_s: float
    metrics_file: Path | None
    warnings: tuple[str, ...] = ()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # gone meanwhile (an expired blob): an estimate is all we need


def planned_bytes(dep: Deployment, include_secrets: bool) -> int:
    """What the progress bar counts: snapshot pages plus archived file bytes (estimate)."""
    total = _size(dep.db_path) if dep.config.storage.backend == "sqlcipher" else 0
    return total + sum(_size(s.path) for s in source_files(dep, include_secrets))


def _full_reason(dest: Path, needed: int) -> str:
    """Why `dest` cannot take `needed` more bytes, if it cannot (SQLite reports a full
    disk or a file size limit only as a generic I/O error, so look for ourselves)."""
    try:
        free = shutil.disk_usage(dest).free
    except OSError:
        return ""
    if free < needed:
        return f"{free / 1e6:,.1f} MB free, about {needed / 1e6:,.1f} MB needed"
    soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        return f"files there may not grow past {soft} bytes (RLIMIT_FSIZE / quota)"
    return ""


def _remove_stale_temp_files(dest: Path) -> None:
    """Temp files of a backup that was killed (kill -9, power loss) before its cleanup:
    `.qpq-backup-<pid>-<ms>.{db,partial}` whose process no longer exists."""
    for path in dest.glob(".qpq-backup-*"):
        pid = path.name.split("-")[2] if path.name.count("-") >= 3 else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running: another backup into the same dir
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            continue


def _source_key(dep: Deployment) -> Secret:
    """The DB key, once the deployment is one this command can back up."""
    db_key = dep.db_key()
    if db_key is None:
        raise Refused(f"QPQ_DB_KEY is not set (environment or {dep.env_file})")
    backend = dep.config.storage.backend
    if backend == "postgres" and not dep.env_value("QPQ_DATABASE_URL"):
        raise Refused(f"QPQ_DATABASE_URL is not set (environment or {dep.env_file})")
    if backend == "sqlcipher" and not dep.db_path.is_file():
        raise OpsError(f"database not found: {dep.db_path} (has the server ever run?)")
    if backend == "file" and not dep.config.file_store_dir.is_dir():
        raise OpsError(f"file store not found: {dep.config.file_store_dir}")
    return db_key


def _temp_paths(dest: Path, started: float) -> tuple[Path, Path]:
    """(snapshot, partial archive) in `dest`, named so a later run can tell them stale."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OpsError(f"cannot create {dest}: {exc.strerror}") from None
    _remove_stale_temp_files(dest)
    token = f".qpq-backup-{os.getpid()}-{int(started * 1000)}"
    return dest / f"{token}.db", dest / f"{token}.partial"


def _snapshot(dep: Deployment, tmp_db: Path, db_key: Secret, progress: ProgressFn | None,
              now: Callable[[], float]) -> Snapshot:
    """A consistent copy of the database at `tmp_db` (the file backend has none: its
    records are archived as files; postgres is dumped by pg_dump)."""
    if dep.config.storage.backend == "file":
        return Snapshot(tmp_db, SCHEMA_VERSION, {}, now(), 0)
    if dep.config.storage.backend == "postgres":
        pg = dump_database(dep.env_value("QPQ_DATABASE_URL"), tmp_db)
        return Snapshot(pg.path, pg.schema_version, pg.row_counts, pg.snapshot_at_unix,
                        pg.size)
    return snapshot_database(dep.db_path, tmp_db, db_key, progress)


def _add_members(writer: ArchiveWriter, req: BackupRequest, tmp_db: Path,
                 progress: ProgressFn | None) -> list[Member]:
    """The snapshot (sqlcipher) or dump (postgres), then every source file still there,
    in layout order."""
    dep = req.deployment
    members: list[Member] = []
    if dep.config.storage.backend != "file":
        name = DUMP_MEMBER if dep.config.storage.backend == "postgres" else DB_MEMBER
        size, digest = writer.add_file(name, tmp_db)
        members.append(Member(name, "database", size, digest))
        tmp_db.unlink()
    for src in source_files(dep, req.include_secrets):
        try:
            size, digest = writer.add_file(src.member, src.path, progress)
        except FileNotFoundError:
            continue  # deleted while we ran (an expired blob): not in the snapshot
        members.append(Member(src.member, src.kind, size, digest))
    return members


def _manifest(req: BackupRequest, snap: Snapshot, members: list[Member],
              created: dt.datetime, db_key: Secret) -> Manifest:
    dep = req.deployment
    file_backend = dep.config.storage.backend == "file"
    counts = counts_from_members([m.name for m in members]) if file_backend \
        else snap.row_counts
    return Manifest(
        format=FORMAT, format_version=FORMAT_VERSION, server_version=server_version,
        schema_version=snap.schema_version,
        created_at=created.isoformat().replace("+00:00", "Z"),
        snapshot_at_unix=snap.snapshot_at_unix, domain=dep.config.server.domain,
        storage_backend=dep.config.storage.backend,
        includes_secrets=req.include_secrets,
        db_key_fingerprint=fingerprint(db_key), row_counts=counts,
        members=tuple(members),
    ).signed(db_key)


def _write_archive(tmp_archive: Path, req: BackupRequest, snap: Snapshot, created: dt.datetime,
                   db_key: Secret, progress: ProgressFn | None) -> Manifest:
    """The whole archive (encrypted when there are recipients), 0600 and fsynced."""
    with tmp_archive.open("xb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        encrypter = AgeWriter(fh, list(req.recipients)) if req.recipients else None
        writer = ArchiveWriter(encrypter or fh)
        members = _add_members(writer, req, snap.path, progress)
        manifest = _manifest(req, snap, members, created, db_key)
        writer.add_bytes("manifest.json", manifest.to_json())
        writer.close()
        if encrypter is not None:
            encrypter.close()
        fh.flush()
        os.fsync(fh.fileno())
    return manifest


def _publish(tmp_archive: Path, final: Path) -> None:
    """Give the finished archive its final name, durably, never over another one."""
    try:
        os.link(tmp_archive, final)  # unlike a rename, never replaces an archive
    except FileExistsError:
        raise Refused(f"{final} already exists; not overwriting a backup") from None
    fsync_dir(final.parent)


def _write_failure(exc: OSError, req: BackupRequest) -> OpsError:
    """One line for a failed write, naming a full destination as such."""
    full = _full_reason(req.dest, planned_bytes(req.deployment, req.include_secrets))
    if exc.errno in _FULL or full:
        return OpsError(f"destination {req.dest} is full ({full or exc.strerror}); "
                        "no backup was written")
    return OpsError(f"backup failed: {exc.strerror or exc}; no backup was written")


def _record_metrics(textfile_dir: Path | None, finished: float, size_bytes: int,
                    duration_s: float) -> tuple[Path | None, tuple[str, ...]]:
    """(metrics file, warnings): a metric that cannot be written does not lose the backup."""
    if textfile_dir is None:
        return None, ()
    try:
        return write_backup_metrics(textfile_dir, finished, size_bytes, duration_s), ()
    except OSError as exc:
        return None, (f"the textfile metric could not be written to {textfile_dir}: "
                      f"{exc.strerror}; the stale-backup alert will fire",)


# Seconds to wait at most for a start time whose archive name is free.
_NAME_WAIT_TRIES = 5


def _unnamed_second(dest: Path, now: Callable[[], float]) -> float:
    """A start time in a second no archive in `dest` is named after yet: names have
    one-second resolution, and a backup right after another (a rotation rerun after a
    killed one, a script) would otherwise be refused for a name that is taken."""
    started = now()
    for _ in range(_NAME_WAIT_TRIES):
        prefix = archive_prefix(dt.datetime.fromtimestamp(started, dt.UTC))
        if not any(dest.glob(glob.escape(prefix) + "*")):
            break
        time.sleep(1.0 - started % 1.0 + 0.01)
        started = now()
    return started  # still taken after the tries: _publish refuses, nothing is lost


def create_backup(req: BackupRequest, progress: ProgressFn | None = None,
                  now: Callable[[], float] = time.time) -> BackupResult:
    """Snapshot the database, archive it with the blob store and OPAQUE setups (and the
    secrets when asked), write under a temp name, fsync, link to the final name. A
    failure at any point leaves no file under the final name and removes the temp files."""
    db_key = _source_key(req.deployment)
    started = _unnamed_second(req.dest, now)
    created = dt.datetime.fromtimestamp(started, dt.UTC)
    tmp_db, tmp_archive = _temp_paths(req.dest, started)
    try:
        snap = _snapshot(req.deployment, tmp_db, db_key, progress, now)
        manifest = _write_archive(tmp_archive, req, snap, created, db_key, progress)
        final = req.dest / archive_name(created, server_version, snap.schema_version,
                                        req.include_secrets, bool(req.recipients))
        _publish(tmp_archive, final)
    except OSError as exc:
        raise _write_failure(exc, req) from None
    finally:
        tmp_db.unlink(missing_ok=True)
        tmp_archive.unlink(missing_ok=True)
    finished = now()
    size_bytes = final.stat().st_size
    metrics_file, warnings = _record_metrics(req.textfile_dir, finished, size_bytes,
                                             finished - started)
    return BackupResult(final, manifest, size_bytes, finished - started, metrics_file,
                        warnings)
