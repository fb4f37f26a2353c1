"""Which files of a deployment go into an archive, and where each member restores to.

Member names:
- `db/qpq.db`                 the SQLCipher database (an online snapshot, still encrypted)
- `db/qpq.pgdump`             the `postgres` backend's database: pg_dump custom format of
                              one snapshot (qpq_ops/backup/pgdump.py); the archive is
                              encrypted as a whole with --encrypt-to
- `data/blobs/...`            the blob store, file by file
- `data/opaque/...`           the OPAQUE server setups (`setup-vN.bin`, `dummy-vN.bin`)
- `data/kt/signing_key.pem`   the key-transparency log's signing key
- `data/store/...`            the `file` storage backend's tree (`[storage] file_dir`), when
                              that backend is used (instead of `db/qpq.db`)
- `secrets/env`               the `.env` beside the config (only with --include-secrets)
- `secrets/tls_cert`, `secrets/tls_key`   the serving certificate and key
- `secrets/data/...`          key files under the data dir: `keys/`, `federation/`, and
                               DESIGN.md's `federation-*` files (cert, key, CA, CA key,
                               bundle, `.previous`) at its top
- `secrets/federation_{cert,key,ca}`      federation files configured outside the data dir

Secrets stay out by default: a key stored beside the data it protects protects nothing.
The OPAQUE setups and the KT signing key are server identity, not protection of the
data: without them no account could log in and every client's pinned KT log key would
mismatch, so they travel with the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from qpq_ops.deployment import Deployment
from qpq_ops.errors import ArchiveDamaged

__all__ = ["DATA_TREES", "DB_MEMBER", "SECRET_TREES", "Source", "restore_target",
           "safe_member_path", "source_files"]

DB_MEMBER = "db/qpq.db"
DATA_TREES = {"blobs": "blob", "opaque": "opaque", "kt": "kt"}
"""Trees under the data dir that are data (member `data/<tree>/...`), by kind."""
SECRET_TREES = ("keys", "federation")
FEDERATION_PREFIX = "federation-"
"""Top-level data-dir files of federation (federation-cert.der, ...), backed up as secrets."""
"""Trees under the data dir that hold keys (member `secrets/data/<tree>/...`)."""


@dataclass(frozen=True)
class Source:
    member: str
    kind: str
    path: Path


_SKIP = {"blob": ("tmp",), "file_store": ("LOCK",)}
"""Per kind, top-level entries that are not data: uploads in progress, the server's lock."""


def _tree(root: Path, prefix: str, kind: str) -> Iterator[Source]:
    if not root.is_dir():
        return
    skip = _SKIP.get(kind, ())
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] in skip or path.name.startswith(".") or path.name.endswith(".tmp"):
            continue
        if path.is_file() and not path.is_symlink():
            yield Source(f"{prefix}/{rel.as_posix()}", kind, path)


def _federation_files(dep: Deployment) -> Iterator[Source]:
    fed = dep.config.federation
    for label, value in (("federation_cert", fed.federation_cert),
                         ("federation_key", fed.federation_key),
                         ("federation_ca", fed.federation_ca)):
        if not value:
            continue
        path = dep.config.path(value)
        if path.is_file() and not path.resolve().is_relative_to(dep.data_dir.resolve()):
            yield Source(f"secrets/{label}", "secret", path)


def source_files(dep: Deployment, include_secrets: bool) -> list[Source]:
    """Every file to archive besides the database snapshot, in a stable order."""
    found: list[Source] = []
    if dep.config.storage.backend == "file":
        store = list(_tree(dep.config.file_store_dir, "data/store", "file_store"))
        # `counters` last: its high-water marks then cover every id copied before it.
        found.extend(sorted(store, key=lambda s: s.member == "data/store/counters"))
    for tree, kind in DATA_TREES.items():
        found.extend(_tree(dep.data_dir / tree, f"data/{tree}", kind))
    if include_secrets:
        if dep.env_file.is_file():
            found.append(Source("secrets/env", "secret", dep.env_file))
        found.append(Source("secrets/tls_cert", "secret", dep.config.tls_cert_path))
        found.append(Source("secrets/tls_key", "secret", dep.config.tls_key_path))
        for tree in SECRET_TREES:
            found.extend(_tree(dep.data_dir / tree, f"secrets/data/{tree}", "secret"))
        # DESIGN.md's federation files (and rotate's CA key, bundle and .previous) sit
        # at the top of the data dir, where no tree covers them
        found.extend(Source(f"secrets/data/{path.name}", "secret", path)
                     for path in sorted(dep.data_dir.glob(f"{FEDERATION_PREFIX}*"))
                     if path.is_file() and not path.is_symlink()
                     and not path.name.endswith(".tmp"))
        found.extend(_federation_files(dep))
    return found


def safe_member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ArchiveDamaged(f"archive member {name!r} has an unsafe path")
    return path


def restore_target(dep: Deployment, member: str) -> Path:
    """Where a member goes on restore (members outside the known layout are refused)."""
    path = safe_member_path(member)
    parts = path.parts
    if member == DB_MEMBER:
        return dep.db_path
    if parts[:2] == ("data", "store") and len(parts) >= 3:
        return dep.config.file_store_dir.joinpath(*parts[2:])
    if parts[0] == "data" and len(parts) >= 3 and parts[1] in DATA_TREES:
        return dep.data_dir.joinpath(*parts[1:])
    if parts[0] == "secrets":
        fed = dep.config.federation
        fixed = {
            "secrets/env": dep.env_file,
            "secrets/tls_cert": dep.config.tls_cert_path,
            "secrets/tls_key": dep.config.tls_key_path,
            "secrets/federation_cert": dep.config.path(
                fed.federation_cert or "federation-cert.der"),
            "secrets/federation_key": dep.config.path(
                fed.federation_key or "federation-key.der"),
            "secrets/federation_ca": dep.config.path(fed.federation_ca or "federation-ca.der"),
        }
        if member in fixed:
            return fixed[member]
        if (len(parts) == 3 and parts[1] == "data"
                and parts[2].startswith(FEDERATION_PREFIX)):
            return dep.data_dir / parts[2]
        if len(parts) >= 4 and parts[1] == "data" and parts[2] in SECRET_TREES:
            return dep.data_dir.joinpath(*parts[2:])
    raise ArchiveDamaged(f"archive member {member!r} is not part of the qpq backup layout")
