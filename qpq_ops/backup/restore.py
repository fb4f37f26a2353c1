"""`restore`: verify an archive, stage it, move the old data aside, place it, purge.

Nothing in the data dir changes until the archive has been fully extracted to a staging
dir inside the data dir and verified there (checksums, key, integrity, row counts). The
old data is then moved aside into `DATA_DIR/pre-restore-<time>/` (never deleted). See
`purge.py` for the end-to-end-encryption step and its crash-safe sequence.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import sqlcipher3
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from qpq_ops.backup.archive import ExtractedMember, extract_archive, read_manifest
from qpq_ops.backup.database import open_db, schema_version
from qpq_ops.backup.doctor import DoctorReport, run_doctor
from qpq_ops.backup.filestore import file_complete_purge, file_mark_pending, file_restore_state
from qpq_ops.backup.journal import PlaceJournal, roll_back
from qpq_ops.backup.layout import (
    DATA_TREES,
    DB_MEMBER,
    FEDERATION_PREFIX,
    SECRET_TREES,
    restore_target,
)
from qpq_ops.backup.manifest import Manifest
from qpq_ops.backup.pgdump import (
    DUMP_MEMBER,
    database_tables,
    other_sessions,
    pg_purge,
    pg_restore_state,
    restore_dump,
)
from qpq_ops.backup.purge import PENDING_PURGE, complete_purge, mark_pending_purge, restore_state
from qpq_ops.backup.verify import check_extracted
from qpq_ops.deployment import Deployment
from qpq_ops.errors import ArchiveDamaged, OpsError, Refused
from qpq_ops.ownership import give_to, owner_of
from qpq_ops.server_process import running_pid
from qpq_server.secrets import Secret, read_env_file, write_env_file
from qpq_server.storage.base import RESTORE_JOURNAL
from qpq_server.storage.migrations import SCHEMA_VERSION
from qpq_server.storage.pg_migrations import PG_SCHEMA_VERSION
from qpq_server.storage.sqlcipher import key_pragma, migrate

__all__ = ["RestoreRequest", "RestoreResult", "existing_data", "restore_archive",
           "resume_restore"]

ProgressFn = Callable[[int], None]
_DB_SIDECARS = ("-wal", "-shm")


@dataclass(frozen=True)
class RestoreRequest:
    archive: Path
    deployment: Deployment
    force: bool = False
    with_secrets: bool = False
    identities: tuple[X25519PrivateKey, ...] = ()  # age identities for `.age` archives


@dataclass(frozen=True)
class RestoreResult:
    manifest: Manifest | None
    aside_dir: Path | None          # where the previous data went (None: nothing to move)
    purged_key_packages: int
    rekeyed: bool                   # re-encrypted to the data dir's own key
    migrated_from: int | None       # schema version before forced migrations
    secrets_restored: bool
    env_key_written: bool           # QPQ_DB_KEY added to a .env that had none
    doctor: DoctorReport
    aside_schema: str | None = None  # postgres: where the previous tables went
    recovered: str | None = None     # an interrupted restore rolled back first: what it did


def existing_data(dep: Deployment) -> list[Path]:
    """What makes a data dir non-empty: a database or any stored blob/file."""
    found = [p for p in (dep.db_path, *(Path(f"{dep.db_path}{s}") for s in _DB_SIDECARS))
             if p.exists()]
    for root in (dep.data_dir / "blobs", dep.config.file_store_dir):
        if root.is_dir() and any(p.is_file() and p.name != "LOCK" for p in root.rglob("*")):
            found.append(root)
    return found


def _database_url(dep: Deployment) -> str:
    dsn = dep.env_value("QPQ_DATABASE_URL")
    if not dsn:
        raise Refused(f"QPQ_DATABASE_URL is not set (environment or {dep.env_file})")
    return dsn


def _postgres_precheck(dep: Deployment) -> list[str]:
    """What the database holds (its tables), after refusing one that nodes still use."""
    dsn = _database_url(dep)
    others = other_sessions(dsn)
    if others:
        raise Refused(f"{others} other connections to the database (a qpq node still "
                      "running?); stop every node first (restore never writes under a "
                      "running server, even with --force)")
    return database_tables(dsn)


def _precheck(req: RestoreRequest) -> Manifest:
    dep = req.deployment
    _refuse_running(dep)
    existing = existing_data(dep)
    postgres = dep.config.storage.backend == "postgres"
    if postgres and (tables := _postgres_precheck(dep)) and not req.force:
        raise Refused(f"the database (QPQ_DATABASE_URL) is not empty ({len(tables)} tables, "
                      f"e.g. {tables[0]}); pass --force to move them aside into a schema "
                      "pre_restore_<time> and restore over it")
    if existing and not req.force:
        raise Refused(f"{dep.data_dir} already holds data ({existing[0].name}); pass --force "
                      "to move it aside into pre-restore-<time>/ and restore over it")
    manifest = read_manifest(req.archive, req.identities)
    if manifest.storage_backend != dep.config.storage.backend:
        raise Refused(f"the archive is of the {manifest.storage_backend!r} storage backend but "
                      f"{dep.config_path} uses {dep.config.storage.backend!r}")
    ours = PG_SCHEMA_VERSION if postgres else SCHEMA_VERSION
    if manifest.schema_version > ours:
        raise Refused(f"archive schema {manifest.schema_version} is newer than this server's "
                      f"({ours}); upgrade qpq first")
    if manifest.schema_version != ours and not req.force:
        raise Refused(f"archive schema {manifest.schema_version} differs from this server's "
                      f"({ours}); pass --force to restore (the server runs the migrations "
                      "when it starts)" if postgres else
                      f"archive schema {manifest.schema_version} differs from this server's "
                      f"({ours}); pass --force to restore and run the migrations")
    if req.with_secrets and not manifest.includes_secrets:
        raise Refused("--with-secrets given but the archive holds no secrets "
                      "(it was made without --include-secrets)")
    return manifest


def _archive_env_key(members: list[ExtractedMember]) -> Secret | None:
    env = next((m for m in members if m.name == "secrets/env"), None)
    value = read_env_file(env.path).get("QPQ_DB_KEY", "") if env else ""
    return Secret(value) if value else None


def _keys(req: RestoreRequest, members: list[ExtractedMember],
          ) -> tuple[Secret, Secret | None]:
    """(key that opens the archive, key the restored database must end up under)."""
    dep = req.deployment
    provided = os.environ.get("QPQ_DB_KEY")
    in_archive = _archive_env_key(members)
    target_value = read_env_file(dep.env_file).get("QPQ_DB_KEY", "")
    target = Secret(target_value) if target_value else None
    opening = Secret(provided) if provided else (in_archive or target)
    if opening is None:
        raise Refused("no database key: set QPQ_DB_KEY to the key the archive was made with "
                      f"(or put it in {dep.env_file})")
    final = in_archive if req.with_secrets else target
    return opening, final


def _aside_path(path: Path, aside: Path, data_dir: Path) -> Path:
    try:
        rel = path.relative_to(data_dir)
    except ValueError:
        rel = Path("outside") / path.name
    return aside / rel


def _move_aside(path: Path, dest: Path) -> None:
    if not path.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.replace(path, dest)


def _checkpoint_old(live: Path, keys: tuple[Secret | None, ...]) -> None:
    """Fold the old database's WAL into its file, so moving the WAL aside moves no rows.
    Best effort: a database no key opens (the reason to restore, sometimes) keeps its WAL
    and relies on the journal alone."""
    if not Path(f"{live}-wal").exists():
        return
    for key in dict.fromkeys(k.reveal() for k in keys if k is not None):
        try:
            conn = open_db(live, Secret(key))
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.close()
        except (OpsError, sqlcipher3.Error):
            continue  # not this key, or a damaged file
        if busy == 0:
            return


def _place_database(staged: Path, live: Path, aside: Path, data_dir: Path,
                    journal: PlaceJournal) -> None:
    """The old database is hard-linked aside (so there is never a moment without a
    database file), its WAL and shm moved aside (so they are never applied to the new
    file), then the staged file replaces it in one rename. The journal lets a rerun put
    the old file and its WAL back together if this is killed half-way."""
    live.parent.mkdir(parents=True, exist_ok=True)
    keep = _aside_path(live, aside, data_dir)
    journal.database(live, keep)
    if live.exists():
        keep.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            os.link(live, keep)
        except OSError:  # no hard links here: a whole copy, renamed in once complete
            partial = keep.with_name(keep.name + ".partial")
            shutil.copy2(live, partial)
            os.replace(partial, keep)
    for suffix in _DB_SIDECARS:
        _move_aside(Path(f"{live}{suffix}"), Path(f"{keep}{suffix}"))
    os.replace(staged, live)


def _place_tree(staging_root: Path, target: Path, aside: Path, data_dir: Path,
                journal: PlaceJournal) -> None:
    dest = _aside_path(target, aside, data_dir)
    journal.moving(target, dest)
    _move_aside(target, dest)
    if staging_root.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging_root, target)
    else:
        target.mkdir(parents=True, exist_ok=True, mode=0o700)


def _place(req: RestoreRequest, staging: Path, members: list[ExtractedMember],
           aside: Path) -> None:
    """Every rename journaled first; the journal goes once the last one is done."""
    dep = req.deployment
    data_dir = dep.data_dir
    journal = PlaceJournal(data_dir, aside)
    _place_files(req, staging, members, aside, journal)
    journal.finish()


def _place_files(req: RestoreRequest, staging: Path, members: list[ExtractedMember],
                 aside: Path, journal: PlaceJournal) -> None:
    dep = req.deployment
    data_dir = dep.data_dir
    if dep.config.storage.backend == "file":
        _place_tree(staging / "data" / "store", dep.config.file_store_dir, aside, data_dir,
                    journal)
    elif dep.config.storage.backend == "sqlcipher":
        _place_database(staging / DB_MEMBER, dep.db_path, aside, data_dir, journal)
    for tree in DATA_TREES:
        staged = staging / "data" / tree
        if tree != "blobs" and not staged.is_dir():
            continue  # an archive without OPAQUE setups or KT key: keep the ones here
        _place_tree(staged, data_dir / tree, aside, data_dir, journal)
    owner = owner_of(data_dir)
    placed = [dep.db_path, dep.config.file_store_dir, aside,
              *(data_dir / tree for tree in DATA_TREES)]
    if not req.with_secrets:
        give_to(placed, owner)
        return
    placed += [data_dir / tree for tree in SECRET_TREES]
    # single files: the fixed secrets, and the top-level federation-* files of the data dir
    single = [m for m in members if m.name.startswith("secrets/") and (
        not m.name.startswith("secrets/data/")
        or (m.name.count("/") == 2
            and m.name.rsplit("/", 1)[1].startswith(FEDERATION_PREFIX)))]
    placed += [restore_target(dep, m.name) for m in single]
    for tree in SECRET_TREES:
        if (staging / "secrets" / "data" / tree).is_dir():
            _place_tree(staging / "secrets" / "data" / tree, data_dir / tree, aside, data_dir,
                        journal)
    for member in single:
        target = restore_target(dep, member.name)
        dest = _aside_path(target, aside, data_dir)
        journal.moving(target, dest)
        _move_aside(target, dest)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.replace(member.path, target)
    give_to(placed, owner)


_STAGING_PREFIX = ".qpq-restore-"


def _remove_stale_staging(data_dir: Path) -> None:
    """A restore killed mid-way leaves its staging dir (a full copy of the archive);
    the next restore removes those whose process is gone. The live data never depends
    on a staging dir: it is only renamed into place, never read from there later."""
    if not data_dir.is_dir():
        return
    for path in data_dir.iterdir():
        if not (path.name.startswith(_STAGING_PREFIX) and path.is_dir()):
            continue
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and Path(f"/proc/{pid}").exists():
            continue  # another restore is running right now
        shutil.rmtree(path, ignore_errors=True)


def _unused(path: Path) -> Path:
    """`path`, or `path-2`, `-3`...: a rerun within the same second as a killed restore
    must not move data into the killed run's half-filled aside dir (rename would fail)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _refuse_running(dep: Deployment) -> None:
    pid = running_pid(dep.config)
    if pid is not None:
        raise Refused(f"qpq-server is running (pid {pid}) on {dep.data_dir}; stop it first "
                      "(restore never writes under a running server, even with --force)")


def restore_archive(req: RestoreRequest, progress: ProgressFn | None = None) -> RestoreResult:
    """Roll back an interrupted restore if one left its journal, then restore."""
    _refuse_running(req.deployment)
    recovered = roll_back(req.deployment.data_dir)
    result = _restore(req, progress)
    return replace(result, recovered=recovered.describe() if recovered else None)


def _restore(req: RestoreRequest, progress: ProgressFn | None) -> RestoreResult:
    dep = req.deployment
    _precheck(req)
    _remove_stale_staging(dep.data_dir)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    dep.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = dep.data_dir / f"{_STAGING_PREFIX}{stamp}-{os.getpid()}"
    staging.mkdir(mode=0o700)
    aside = _unused(dep.data_dir / f"pre-restore-{stamp}")
    try:
        try:
            manifest, members = extract_archive(req.archive, staging, progress,
                                                req.identities)
        except OSError as exc:
            raise OpsError(f"cannot stage the archive in {dep.data_dir}: "
                           f"{exc.strerror or exc}; nothing was changed") from None
        opening, final = _keys(req, members)
        _checked, problems = check_extracted(manifest, members, opening)
        if problems:
            raise ArchiveDamaged(f"{req.archive.name} failed verification, nothing was "
                                 f"changed: {'; '.join(problems[:3])}")
        names = {m.name for m in members}
        migrated_from = None
        rekeyed = False
        if manifest.storage_backend == "file":
            if not (staging / "data" / "store").is_dir():
                raise ArchiveDamaged(f"{req.archive.name} holds no file store")
            file_mark_pending(staging / "data" / "store", req.archive.name)
            (staging / "data" / "store" / "LOCK").unlink(missing_ok=True)
            _place(req, staging, members, aside)
            return _complete(req, manifest, aside, opening, final, rekeyed, migrated_from)
        if manifest.storage_backend == "postgres":
            return _restore_postgres(req, manifest, staging, members, aside, stamp,
                                     opening, final)
        if DB_MEMBER not in names:
            raise ArchiveDamaged(f"{req.archive.name} holds no database")
        conn = open_db(staging / DB_MEMBER, opening)
        try:
            mark_pending_purge(conn, req.archive.name)
            version = schema_version(conn)
            if version != SCHEMA_VERSION:
                migrated_from = version
                migrate(conn)
            if final is not None and final.reveal() != opening.reveal():
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                conn.execute(key_pragma(final).replace("PRAGMA key", "PRAGMA rekey", 1))
                rekeyed = True
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        # -- from here on the data dir changes ------------------------------------------
        _checkpoint_old(dep.db_path, (dep.db_key({}), opening))
        _place(req, staging, members, aside)
        return _complete(req, manifest, aside, opening, final, rekeyed, migrated_from)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _restore_postgres(req: RestoreRequest, manifest: Manifest, staging: Path,
                      members: list[ExtractedMember], aside: Path, stamp: str,
                      opening: Secret, final: Secret | None) -> RestoreResult:
    """The dump into the database in one transaction (old tables aside, key packages
    purged), then the files into the data dir."""
    if DUMP_MEMBER not in {m.name for m in members}:
        raise ArchiveDamaged(f"{req.archive.name} holds no database dump")
    dsn = _database_url(req.deployment)
    schema = f"pre_restore_{stamp.lower()}"
    had_tables = bool(database_tables(dsn))
    restore_dump(dsn, staging / DUMP_MEMBER, req.archive.name,
                 schema if had_tables else None, staging)
    # -- from here on the data dir changes ----------------------------------------------
    _place(req, staging, members, aside)
    return _complete(req, manifest, aside, opening, final, False, None,
                     purged=int(manifest.row_counts.get("key_packages", 0)),
                     aside_schema=schema if had_tables else None)


def _complete(req: RestoreRequest, manifest: Manifest, aside: Path, opening: Secret,
              final: Secret | None, rekeyed: bool, migrated_from: int | None,
              purged: int | None = None, aside_schema: str | None = None,
              ) -> RestoreResult:
    """After the files are in place: make sure the .env has the key, purge, doctor."""
    dep = req.deployment
    live_key = final or opening
    env_key_written = False
    if not read_env_file(dep.env_file).get("QPQ_DB_KEY"):
        values = read_env_file(dep.env_file)
        values["QPQ_DB_KEY"] = live_key.reveal()
        write_env_file(dep.env_file, values)
        give_to([dep.env_file], owner_of(dep.data_dir))
        env_key_written = True
    purged = _finish(dep, live_key) + (purged or 0)
    return RestoreResult(
        manifest=manifest, aside_dir=aside if aside.exists() else None,
        purged_key_packages=purged, rekeyed=rekeyed, migrated_from=migrated_from,
        secrets_restored=req.with_secrets, env_key_written=env_key_written,
        doctor=run_doctor(dep, live_key, full_integrity=False), aside_schema=aside_schema)


def _finish(dep: Deployment, db_key: Secret) -> int:
    if dep.config.storage.backend == "postgres":
        dsn = _database_url(dep)
        return pg_purge(dsn) if pg_restore_state(dsn) == PENDING_PURGE else 0
    if dep.config.storage.backend == "file":
        store = dep.config.file_store_dir
        return file_complete_purge(store) if file_restore_state(store) == PENDING_PURGE else 0
    conn = open_db(dep.db_path, db_key)
    try:
        return complete_purge(conn) if restore_state(conn) == PENDING_PURGE else 0
    finally:
        conn.close()


def resume_restore(dep: Deployment) -> RestoreResult:
    """Finish an interrupted restore: roll back one killed while placing files (the old
    data is then in place), run the purge step if it is pending, then the doctor."""
    pid = running_pid(dep.config)
    if pid is not None:
        raise Refused(f"qpq-server is running (pid {pid}); a pending restore cannot be "
                      "running, nothing to resume")
    db_key = dep.db_key()
    if db_key is None:
        raise Refused(f"QPQ_DB_KEY is not set (environment or {dep.env_file})")
    if dep.config.storage.backend == "postgres" and (dep.data_dir / RESTORE_JOURNAL).exists():
        # The database load committed before the files moved: rolling the files back
        # would pair the restored database with the old files. Redo the whole restore.
        raise Refused("a restore was killed while placing files, after its database load "
                      "had committed; rerun the same `qpq-ops restore ARCHIVE --force` (it "
                      "puts the old files back first, then restores everything)")
    recovered = roll_back(dep.data_dir)
    purged = _finish(dep, db_key)
    return RestoreResult(None, None, purged, False, None, False, False,
                         run_doctor(dep, db_key),
                         recovered=recovered.describe() if recovered else None)
