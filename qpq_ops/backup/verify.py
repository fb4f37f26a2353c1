"""`backup verify`: every check a restore relies on, run on a copy, reporting all problems.

Checks: the archive reads to its end; every member matches the manifest's size and
sha256 and nothing is missing or extra; blobs named by their sha256 hash to their name;
with the database key: the manifest MAC, then (sqlcipher) the database opens, `PRAGMA
cipher_integrity_check` and `PRAGMA integrity_check` pass, schema version and row counts
match the manifest; (postgres) the pg_dump reads to its end and its rows per table
match the manifest.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from qpq_ops.backup.archive import ExtractedMember, extract_archive
from qpq_ops.backup.database import check_integrity, open_db, row_counts, schema_version
from qpq_ops.backup.filestore import store_counts, store_problems
from qpq_ops.backup.layout import DB_MEMBER
from qpq_ops.backup.manifest import Manifest, fingerprint
from qpq_ops.backup.pgdump import DUMP_MEMBER, dump_counts
from qpq_ops.errors import ArchiveDamaged, OpsError, WrongKey
from qpq_server.secrets import Secret

__all__ = ["VerifyReport", "check_extracted", "verify_archive"]

ProgressFn = Callable[[int], None]
_SHA256_NAME = re.compile(r"^[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class VerifyReport:
    archive: Path
    manifest: Manifest
    members_checked: int
    database_checked: bool  # False when no key was available: checksums only
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _member_problems(manifest: Manifest, members: list[ExtractedMember]) -> list[str]:
    problems = []
    found = {m.name: m for m in members}
    for expected in manifest.members:
        got = found.get(expected.name)
        if got is None:
            what = "blob" if expected.kind == "blob" else "member"
            problems.append(f"missing {what} {expected.name}")
        elif got.size != expected.size or got.sha256 != expected.sha256:
            problems.append(f"checksum mismatch in {expected.name} (tampered or corrupted)")
        elif expected.kind == "blob":
            name = Path(expected.name).name
            if _SHA256_NAME.match(name) and name != got.sha256:
                problems.append(f"blob {expected.name} does not hash to its name")
    listed = {m.name for m in manifest.members}
    problems += [f"unexpected member {name} (not in the manifest)"
                 for name in sorted(set(found) - listed)]
    return problems


def check_extracted(manifest: Manifest, members: list[ExtractedMember],
                    db_key: Secret | None) -> tuple[bool, list[str]]:
    """Compare extracted members with the manifest; with a key, check the database too.

    Raises WrongKey when the key does not open the database.
    """
    problems = _member_problems(manifest, members)
    if db_key is None:
        return False, problems
    if not manifest.mac_ok(db_key):
        if fingerprint(db_key) != manifest.db_key_fingerprint:
            raise WrongKey("the database key is not the one this archive was made with "
                           f"(archive key {manifest.db_key_fingerprint}, "
                           f"given key {fingerprint(db_key)})")
        problems.append("manifest MAC does not match (manifest edited after the backup)")
    if manifest.storage_backend == "file":
        store = next((m.path for m in members if m.name.startswith("data/store/")), None)
        if store is not None:
            root = store
            while root.name != "store":
                root = root.parent
            _read, decode_problems, _setups = store_problems(root)
            problems += decode_problems
            counts = store_counts(root)
            problems += [f"{t}: {counts.get(t)} records, manifest says {n}"
                         for t, n in manifest.row_counts.items() if counts.get(t) != n]
        return True, problems
    if manifest.storage_backend == "postgres":
        return True, problems + _dump_problems(manifest, members, problems)
    db = next((m for m in members if m.name == DB_MEMBER), None)
    if db is None or any(DB_MEMBER in p for p in problems):
        return False, problems  # a damaged copy: its checksum problem says enough
    conn = open_db(db.path, db_key)
    try:
        report = check_integrity(conn)
        problems += [f"cipher_integrity_check: {p}" for p in report.cipher_problems]
        if report.integrity != ("ok",):
            problems += [f"integrity_check: {p}" for p in report.integrity[:10]]
        version = schema_version(conn)
        if version != manifest.schema_version:
            problems.append(f"database schema {version} but manifest says "
                            f"{manifest.schema_version}")
        counts = row_counts(conn)
        for table, expected in manifest.row_counts.items():
            if counts.get(table) != expected:
                problems.append(f"table {table}: {counts.get(table)} rows, manifest says "
                                f"{expected}")
    finally:
        conn.close()
    return True, problems


def _dump_problems(manifest: Manifest, members: list[ExtractedMember],
                   problems: list[str]) -> list[str]:
    """The pg_dump reads to its end and holds the rows the manifest counted."""
    dump = next((m for m in members if m.name == DUMP_MEMBER), None)
    if dump is None:
        return [f"missing member {DUMP_MEMBER}"] if not problems else []
    if any(DUMP_MEMBER in p for p in problems):
        return []  # a damaged copy: its checksum problem says enough
    try:
        counts = dump_counts(dump.path)
    except ArchiveDamaged as exc:
        return [str(exc)]
    return [f"table {t}: {counts.get(t)} rows in the dump, manifest says {n}"
            for t, n in manifest.row_counts.items() if counts.get(t, 0) != n]


def verify_archive(archive: Path, db_key: Secret | None, work_dir: Path | None = None,
                   progress: ProgressFn | None = None,
                   identities: Sequence[X25519PrivateKey] = ()) -> VerifyReport:
    """Extract into a scratch dir beside the archive (or `work_dir`), check, clean up."""
    scratch = Path(tempfile.mkdtemp(prefix=".qpq-verify-", dir=work_dir or archive.parent))
    try:
        manifest, members = extract_archive(archive, scratch, progress, identities)
        checked, problems = check_extracted(manifest, members, db_key)
    except OSError as exc:
        raise OpsError(f"cannot verify {archive.name}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return VerifyReport(archive, manifest, len(members), checked, tuple(problems))
