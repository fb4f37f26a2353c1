"""The post-restore doctor: does the restored data dir hold up, row by row and blob by blob?

Checks (each reported, none stops the others):
- the database opens with the key; `cipher_integrity_check` and `integrity_check` pass;
- the restore's key-package purge is recorded as done and no key package is left;
- every row of every table decodes: it is read in full, and each column of the known
  tables has the storage type the server writes (SQLite itself would accept anything);
- every account's OPAQUE setup version has its `opaque/setup-vN.bin`;
- the blob store is whole: every `.meta` has its blob file (of the recorded size) and
  every blob its `.meta` (layout in docs/storage-backends.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpq_ops.backup.database import check_integrity, open_db
from qpq_ops.backup.filestore import file_restore_state, store_counts, store_problems
from qpq_ops.backup.pgdump import pg_facts
from qpq_ops.backup.purge import DONE, restore_state
from qpq_ops.deployment import Deployment
from qpq_ops.errors import OpsError
from qpq_server.secrets import Secret

__all__ = ["DoctorCheck", "DoctorReport", "run_doctor"]

Connection = Any
_TYPES: dict[str, dict[str, tuple[str, ...]]] = {
    "accounts": {"username": ("text",), "password_file": ("blob",),
                 "setup_version": ("integer",), "identity_key": ("blob", "null"),
                 "created_at": ("real", "integer")},
    "key_packages": {"id": ("integer",), "username": ("text",), "key_package": ("blob",)},
    "messages": {"id": ("integer",), "recipient": ("text",), "sender": ("text",),
                 "payload": ("blob",), "sent_at": ("real", "integer")},
    "meta": {"key": ("text",), "value": ("text",)},
    "kt_leaves": {"idx": ("integer",), "username": ("text",), "leaf": ("blob",),
                  "created_at": ("real", "integer")},
}
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_SETUP = re.compile(r"^setup-v(\d+)\.bin\Z")


@dataclass(frozen=True)
class DoctorCheck:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class DoctorReport:
    checks: tuple[DoctorCheck, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def _tables(conn: Connection) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " ORDER BY name")]


def _rows_decode(conn: Connection) -> DoctorCheck:
    """One pass per table reading every column of every row, checking storage types.

    Page-level decoding (every page's HMAC, every overflow chain) is what
    `cipher_integrity_check` and `integrity_check` prove; this adds the row level.
    """
    bad: list[str] = []
    total = 0
    for table in _tables(conn):
        types = _TYPES.get(table, {})
        columns = [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
        conditions = [
            f'typeof("{c}") NOT IN ({",".join(repr(t) for t in types[c])})'
            for c in columns if c in types]
        touch = " + ".join(f'length("{c}")' for c in columns) or "0"
        where = " OR ".join(conditions) or "0"
        (rows, wrong, _bytes) = conn.execute(
            f'SELECT count(*), coalesce(sum({where}), 0), sum({touch}) FROM "{table}"'  # noqa: S608
        ).fetchone()
        total += int(rows)
        if wrong:
            for c in columns:
                if c not in types:
                    continue
                marks = ",".join(repr(t) for t in types[c])
                (count,) = conn.execute(
                    f'SELECT count(*) FROM "{table}" WHERE typeof("{c}") NOT IN ({marks})'  # noqa: S608
                ).fetchone()
                if count:
                    bad.append(f"{table}.{c}: {count} rows of the wrong type")
    detail = "; ".join(bad) if bad else f"{total} rows read, every column of the type expected"
    return DoctorCheck("rows decode", not bad, detail)


def _accounts_per_setup(conn: Connection) -> dict[int, int]:
    return {int(r[0]): int(r[1]) for r in conn.execute(
        "SELECT setup_version, count(*) FROM accounts GROUP BY setup_version")}


def _opaque_setups(used: dict[int, int], opaque_dir: Path) -> DoctorCheck:
    have = {int(m.group(1)) for p in (opaque_dir.iterdir() if opaque_dir.is_dir() else ())
            if (m := _SETUP.match(p.name))}
    missing = {v: n for v, n in used.items() if v not in have}
    if missing:
        return DoctorCheck("OPAQUE setups", False, "; ".join(
            f"{n} accounts need opaque/setup-v{v}.bin, which is missing"
            for v, n in sorted(missing.items())))
    return DoctorCheck("OPAQUE setups", bool(have),
                       f"setups {sorted(have)}; accounts per setup {dict(sorted(used.items()))}"
                       if have else f"no OPAQUE setup in {opaque_dir}")


def _blob_store(blobs_dir: Path) -> DoctorCheck:
    """Every `.meta` has its blob (and its size), every blob has its `.meta`."""
    if not blobs_dir.is_dir():
        return DoctorCheck("blobs present", True, "no blob store")
    files = {p.name: p for p in blobs_dir.rglob("*")
             if p.is_file() and "tmp" not in p.relative_to(blobs_dir).parts[:1]}
    blobs = {n for n in files if _HEX64.match(n)}
    metas = {n.removesuffix(".meta") for n in files if n.endswith(".meta")}
    problems = [f"blob {n} has no content file" for n in sorted(metas - blobs)]
    problems += [f"blob {n} has no .meta" for n in sorted(blobs - metas)]
    for name in sorted(blobs & metas):
        try:
            size = json.loads(files[f"{name}.meta"].read_bytes()).get("size")
        except (OSError, ValueError, AttributeError):
            problems.append(f"blob {name}: .meta does not decode")
            continue
        if isinstance(size, int) and files[name].stat().st_size != size:
            problems.append(f"blob {name}: {files[name].stat().st_size} bytes, .meta says {size}")
    if problems:
        return DoctorCheck("blobs present", False,
                           f"{len(problems)} problems (first: {problems[0]})")
    return DoctorCheck("blobs present", True,
                       f"{len(blobs)} blobs, each with its .meta and size")


def _file_doctor(dep: Deployment) -> DoctorReport:
    root = dep.config.file_store_dir
    try:
        state = file_restore_state(root)
    except OpsError as exc:
        return DoctorReport((DoctorCheck("store opens", False, str(exc)),))
    read, problems, per_setup = store_problems(root)
    left = store_counts(root)["key_packages"]
    return DoctorReport((
        DoctorCheck("store opens", True, f"{root} opens (format and lock ok)"),
        DoctorCheck("key packages purged", state in (None, DONE) and (state is None or not left),
                    f"restore_state={state or 'unset'}, {left} one-time key packages stored"),
        DoctorCheck("rows decode", not problems,
                    "; ".join(problems[:3]) if problems else f"{read} records read in full"),
        _opaque_setups(per_setup, dep.data_dir / "opaque"),
        _blob_store(dep.data_dir / "blobs"),
    ))


def _postgres_doctor(dep: Deployment) -> DoctorReport:
    dsn = dep.env_value("QPQ_DATABASE_URL")
    try:
        facts = pg_facts(dsn)
    except OpsError as exc:
        return DoctorReport((DoctorCheck("database opens", False, str(exc)),))
    state = facts.restore_state
    return DoctorReport((
        DoctorCheck("database opens", True, f"PostgreSQL {facts.server_version} answers "
                    "with the qpq schema"),
        DoctorCheck("key packages purged",
                    state in (None, DONE) and (state is None or not facts.key_packages),
                    f"restore_state={state or 'unset'}, {facts.key_packages} one-time key "
                    "packages stored"),
        DoctorCheck("rows decode", True, f"{facts.rows_read} rows read in full"),
        _opaque_setups(facts.accounts_per_setup, dep.data_dir / "opaque"),
        _blob_store(dep.data_dir / "blobs"),
    ))


def run_doctor(dep: Deployment, db_key: Secret, *, full_integrity: bool = True,
               ) -> DoctorReport:
    """Check the data dir of `dep` (the server should be stopped, not required).

    `full_integrity=False` (right after a restore verified the same b-tree on its staged
    copy) runs `cipher_integrity_check` but skips the slower `integrity_check`.
    """
    if dep.config.storage.backend == "file":
        return _file_doctor(dep)
    if dep.config.storage.backend == "postgres":
        return _postgres_doctor(dep)
    checks: list[DoctorCheck] = []
    try:
        conn = open_db(dep.db_path, db_key)
    except OpsError as exc:
        return DoctorReport((DoctorCheck("database opens", False, str(exc)),))
    try:
        checks.append(DoctorCheck("database opens", True, f"{dep.db_path} opens with the key"))
        integrity = check_integrity(conn, full=full_integrity)
        passed = ("cipher_integrity_check and integrity_check pass" if full_integrity else
                  "cipher_integrity_check passes (integrity_check passed on the staged copy)")
        checks.append(DoctorCheck(
            "integrity", integrity.ok, passed if integrity.ok else
            "; ".join((*integrity.cipher_problems, *integrity.integrity))[:500]))
        state = restore_state(conn)
        (left,) = conn.execute("SELECT count(*) FROM key_packages").fetchone()
        purge_ok = state in (None, DONE) and (state is None or left == 0)
        checks.append(DoctorCheck(
            "key packages purged", purge_ok,
            f"restore_state={state or 'unset'}, {left} one-time key packages stored"))
        checks.append(_rows_decode(conn))
        checks.append(_opaque_setups(_accounts_per_setup(conn), dep.data_dir / "opaque"))
        checks.append(_blob_store(dep.data_dir / "blobs"))
    finally:
        conn.close()
    return DoctorReport(tuple(checks))
