"""Helpers shared by the backup and rotation tests: run qpq-ops, populate a data dir,
fingerprint a tree so "nothing changed" can be asserted."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from qpq_ops.cli import app
from qpq_server.secrets import Secret
from qpq_server.storage.sqlcipher import connect_sqlcipher, migrate
from tests.helpers.server import read_env_file, start_server
from tests.server.conftest import client_factory_for

runner = CliRunner()


@dataclass
class OpsRun:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def ops(*args: str | Path, env: dict[str, str] | None = None,
        stdin: str | None = None) -> OpsRun:
    """Run `qpq-ops ARGS` in process (real code, real files); QPQ_* env cleared first."""
    clean = {k: None for k in os.environ if k.startswith("QPQ_")}
    result = runner.invoke(app, [str(a) for a in args], env={**clean, **(env or {})},
                           input=stdin)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return OpsRun(result.exit_code, result.stdout, result.stderr)


def tree_digest(root: Path, skip: tuple[str, ...] = ("server.log",)) -> dict[str, str]:
    """sha256 of every file under root (by relative path): equal digests = untouched."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name not in skip:
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def db_key_of(config: Path) -> str:
    return read_env_file(config.parent / ".env")["QPQ_DB_KEY"]


def with_database(config: Path) -> Path:
    """Create the (empty, migrated) database the server would, without starting it."""
    conn = connect_sqlcipher(config.parent / "qpq.db", Secret(db_key_of(config)))
    migrate(conn)
    conn.close()
    return config


def blob_member(digest: str) -> str:
    return f"data/blobs/{digest[:2]}/{digest[2:4]}/{digest}"


def add_blob(data_dir: Path, content: bytes) -> str:
    """A blob as the server's blob store keeps it: blobs/ab/cd/<sha256> plus `.meta`."""
    digest = hashlib.sha256(content).hexdigest()
    path = data_dir / "blobs" / digest[:2] / digest[2:4] / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    path.with_name(digest + ".meta").write_text(json.dumps(
        {"owner": "alice", "size": len(content), "created_at": time.time(),
         "pending": ["bob"]}))
    (data_dir / "blobs" / "tmp").mkdir(exist_ok=True)
    (data_dir / "blobs" / "tmp" / "upload.part").write_bytes(b"half an upload")
    return digest


async def populate(config: Path, profiles: Path, messages: int = 3) -> None:
    """Start the server, register alice and bob, alice sends bob `messages` texts, stop."""
    srv = start_server(config)
    try:
        async with client_factory_for(srv, profiles)() as c:
            await c.register("alice", "pw-alice")
            await c.register("bob", "pw-bob")
            for i in range(messages):
                await c.send_text("alice", ["bob"], f"message {i}")
    finally:
        srv.stop()
