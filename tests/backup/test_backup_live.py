"""Backup of a live server under traffic, restore on a fresh box, serve the same data."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qpq_server.client import ClientError
from qpq_server.devserver import await_until, init_server_dir, start_server
from tests.backup.support import add_blob, db_key_of, ops
from tests.server.conftest import client_factory_for

QPQ_OPS = str(Path(sys.executable).parent / "qpq-ops")


async def test_backup_under_traffic_restores_every_acknowledged_message(tmp_path: Path) -> None:
    config = init_server_dir(tmp_path / "live")
    blob = add_blob(config.parent, b"ciphertext of an attachment")
    srv = start_server(config)
    acknowledged: list[tuple[float, str]] = []
    try:
        make = client_factory_for(srv, tmp_path / "profiles")
        async with make() as c:
            await c.register("alice", "pw-alice")
            await c.register("bob", "pw-bob")
            stop = asyncio.Event()

            async def keep_sending() -> None:
                i = 0
                while not stop.is_set():
                    text = f"message {i}"
                    await c.send_text("alice", ["bob"], text)
                    acknowledged.append((time.time(), text))  # after the server's ack
                    i += 1

            sender = asyncio.create_task(keep_sending())
            await await_until(lambda: len(acknowledged) >= 20, 30, "20 acknowledged messages")
            proc = await asyncio.create_subprocess_exec(
                QPQ_OPS, "backup", "create", "--config", str(config),
                "--dest", str(tmp_path / "backups"), "--textfile-dir", str(tmp_path / "tf"),
                "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={k: v for k, v in os.environ.items() if not k.startswith("QPQ_")})
            out, errs = await asyncio.wait_for(proc.communicate(), 60)
            sent = len(acknowledged)  # keep sending a little after the snapshot too
            await await_until(lambda: len(acknowledged) >= sent + 5, 30, "5 more messages")
            stop.set()
            await sender
    finally:
        srv.stop()
    assert proc.returncode == 0, errs.decode()
    created = json.loads(out)
    snapshot_at = created["snapshot_at_unix"]
    before = [text for at, text in acknowledged if at < snapshot_at]
    assert len(before) >= 20 and created["row_counts"]["messages"] >= len(before)
    assert created["includes_secrets"] is False

    families = {f.name: f for f in text_string_to_metric_families(
        (tmp_path / "tf" / "qpq_backup.prom").read_text())}
    assert families["qpq_backup_last_success_timestamp_seconds"].samples[0].value >= snapshot_at
    assert families["qpq_backup_last_size_bytes"].samples[0].value == created["size_bytes"]
    assert "qpq_backup_last_duration_seconds" in families
    archive = Path(created["archive"])
    assert "-v0.1.0-schema" in archive.name and archive.stat().st_mode & 0o777 == 0o600

    # A new box: a fresh `qpq-server init` (its own new DB key), the old key provided.
    fresh = init_server_dir(tmp_path / "fresh")
    restored = ops("restore", archive, "--config", fresh, "--json",
                   env={"QPQ_DB_KEY": db_key_of(config)})
    assert restored.exit_code == 0, restored.stderr
    report = restored.json()
    assert report["doctor"]["ok"] and report["rekeyed"] is True
    assert report["purged_key_packages"] > 0
    kt_key = "kt/signing_key.pem"  # server identity travels with the data: KT pins hold
    assert (fresh.parent / kt_key).read_bytes() == (config.parent / kt_key).read_bytes()
    assert (fresh.parent / ".env").read_text() != (config.parent / ".env").read_text()
    blob_path = fresh.parent / "blobs" / blob[:2] / blob[2:4] / blob
    assert blob_path.read_bytes() == b"ciphertext of an attachment"
    assert not (fresh.parent / "blobs" / "tmp").exists()  # uploads in progress: not data
    checks = {c["name"]: c for c in report["doctor"]["checks"]}
    assert checks["blobs present"]["detail"].startswith("1 blobs")

    srv = start_server(fresh)
    try:
        async with client_factory_for(srv, tmp_path / "profiles")() as c:
            await c.login("bob", "pw-bob")
            received: list[str] = []
            while batch := await c.receive("bob"):
                received += [m.text for m in batch]
            assert set(before) <= set(received)
            assert not any(m.startswith("[undecryptable") for m in received)
            with pytest.raises(ClientError):
                await c.login("alice", "wrong")
            await c.login("alice", "pw-alice")  # the same accounts, same passwords
    finally:
        srv.stop()
