"""The `file` storage backend is backed up, verified and restored the same way."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.backup.support import db_key_of, ops, populate
from tests.helpers.server import init_data_dir, start_server
from tests.server.conftest import client_factory_for

FILE_BACKEND = {"storage": {"backend": "file"}}


def test_file_backend_round_trip_purges_key_packages_and_serves_messages(
        tmp_path: Path) -> None:
    source = init_data_dir(tmp_path / "src", FILE_BACKEND)
    asyncio.run(populate(source, tmp_path / "p"))
    created = ops("backup", "create", "--config", source, "--dest", tmp_path / "b",
                  "--no-textfile", "--json")
    assert created.exit_code == 0, created.stderr
    info = created.json()
    assert info["row_counts"]["accounts"] == 2 and info["row_counts"]["messages"] == 3
    assert info["row_counts"]["key_packages"] > 0
    archive = info["archive"]
    verified = ops("backup", "verify", archive, "--config", source, "--json")
    assert verified.exit_code == 0 and verified.json()["database_checked"], verified.stdout

    sqlcipher_box = init_data_dir(tmp_path / "wrong-backend")
    mismatch = ops("restore", archive, "--config", sqlcipher_box,
                   env={"QPQ_DB_KEY": db_key_of(source)})
    assert mismatch.exit_code == 64 and "storage backend" in mismatch.stderr

    fresh = init_data_dir(tmp_path / "fresh", FILE_BACKEND)
    restored = ops("restore", archive, "--config", fresh, "--json",
                   env={"QPQ_DB_KEY": db_key_of(source)})
    assert restored.exit_code == 0, restored.stderr + restored.stdout
    report = restored.json()
    assert report["purged_key_packages"] == info["row_counts"]["key_packages"]
    assert report["doctor"]["ok"], report["doctor"]
    store = fresh.parent / "store"
    assert not [p for p in (store / "keypackages").rglob("*") if p.is_file()]

    async def receive() -> list[str]:
        srv = start_server(fresh)
        try:
            async with client_factory_for(srv, tmp_path / "p")() as c:
                await c.login("bob", "pw-bob")
                return [m.text for m in await c.receive("bob")]
        finally:
            srv.stop()

    assert asyncio.run(receive()) == ["message 0", "message 1", "message 2"]


def test_rotations_on_the_file_backend(tmp_path: Path) -> None:
    config = init_data_dir(tmp_path / "d", FILE_BACKEND)
    asyncio.run(populate(config, tmp_path / "p", messages=0))
    refused = ops("rotate", "db-key", "--config", config)
    assert refused.exit_code == 64 and "no SQLCipher database" in refused.stderr
    assert ops("rotate", "opaque", "--config", config).exit_code == 0
    finish = ops("rotate", "opaque", "--config", config, "--finish", "--json")
    assert finish.exit_code == 0, finish.stderr
    assert "2 accounts still on v1" in finish.json()["next_steps"][0]
