"""The archive manifest: what a backup holds, and the checksums that prove it.

The manifest is the last member of the archive (`manifest.json`), so the archive can be
written in one pass. Its `mac` is an HMAC-SHA256 over the rest of the manifest under a
key derived from the database key: with the key, `verify` also detects a manifest that
was edited to match tampered members.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from qpq_ops.errors import ArchiveDamaged
from qpq_server.secrets import Secret

__all__ = [
    "ARCHIVE_SUFFIX",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Manifest",
    "Member",
    "archive_name",
    "fingerprint",
    "parse_archive_name",
]

FORMAT = "qpq-backup"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ARCHIVE_SUFFIX = ".tar"
_NAME = re.compile(
    r"^qpq-backup-(?P<ts>\d{8}T\d{6}Z)-v(?P<version>[0-9A-Za-z.+-]+?)"
    r"-schema(?P<schema>\d+)(?P<secrets>-with-secrets)?\.tar(?P<age>\.age)?$"
)


def fingerprint(secret: Secret | bytes) -> str:
    """A short public fingerprint of a secret: says which one, reveals nothing usable."""
    raw = secret if isinstance(secret, bytes) else secret.reveal().encode()
    return "sha256:" + hashlib.sha256(b"qpq-fingerprint\x00" + raw).hexdigest()[:16]


def archive_prefix(created: dt.datetime) -> str:
    """The start of every archive name made in `created`'s second."""
    return f"qpq-backup-{created.astimezone(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}-"


def archive_name(created: dt.datetime, server_version: str, schema: int,
                 with_secrets: bool, encrypted: bool = False) -> str:
    tail = "-with-secrets" if with_secrets else ""
    age = ".age" if encrypted else ""
    return f"{archive_prefix(created)}v{server_version}-schema{schema}{tail}{ARCHIVE_SUFFIX}{age}"


def parse_archive_name(name: str) -> dt.datetime | None:
    """Creation time from an archive's file name, or None if it is not one of ours."""
    match = _NAME.match(name)
    if not match:
        return None
    return dt.datetime.strptime(match["ts"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Member:
    name: str      # path inside the archive, e.g. "db/qpq.db", "blobs/ab/ab12..."
    kind: str      # database | blob | opaque | file_store | secret
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    format: str
    format_version: int
    server_version: str
    schema_version: int
    created_at: str             # ISO 8601 UTC
    snapshot_at_unix: float     # every commit acknowledged before this is in the archive
    domain: str
    storage_backend: str
    includes_secrets: bool
    db_key_fingerprint: str
    row_counts: dict[str, int]
    members: tuple[Member, ...]
    mac: str = ""

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)

    @property
    def total_bytes(self) -> int:
        return sum(m.size for m in self.members)

    def _body(self) -> bytes:
        data = asdict(self)
        data.pop("mac")
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, db_key: Secret) -> Manifest:
        return replace(self, mac=_mac(db_key, self._body()))

    def mac_ok(self, db_key: Secret) -> bool:
        return hmac.compare_digest(self.mac, _mac(db_key, self._body()))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            data: dict[str, Any] = json.loads(raw)
            if data.get("format") != FORMAT:
                raise ArchiveDamaged("manifest.json is not a qpq backup manifest")
            if int(data["format_version"]) > FORMAT_VERSION:
                raise ArchiveDamaged(
                    f"archive format {data['format_version']} is newer than this qpq-ops "
                    f"understands ({FORMAT_VERSION}); upgrade qpq-ops")
            members = tuple(Member(**m) for m in data.pop("members"))
            return cls(members=members, **data)
        except ArchiveDamaged:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise ArchiveDamaged(f"manifest.json is malformed: {exc}") from None


def _mac(db_key: Secret, body: bytes) -> str:
    mac_key = hmac.new(db_key.reveal().encode(), b"qpq-backup-manifest-mac", "sha256").digest()
    return hmac.new(mac_key, body, "sha256").hexdigest()

