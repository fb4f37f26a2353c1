"""A restore interrupted before its key-package purge: the server refuses to start until
`qpq-ops restore --resume` finishes the purge."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from qpq_server.secrets import Secret
from qpq_server.storage.sqlcipher import connect_sqlcipher
from tests.backup.support import db_key_of, ops, populate
from tests.helpers.server import BIN, init_data_dir, start_server


def test_interrupted_restore_blocks_the_server_until_resumed(tmp_path: Path) -> None:
    source = init_data_dir(tmp_path / "src")
    asyncio.run(populate(source, tmp_path / "p"))
    created = ops("backup", "create", "--config", source, "--dest", tmp_path / "b",
                  "--no-textfile", "--json")
    assert created.exit_code == 0, created.stderr
    target = init_data_dir(tmp_path / "dst")
    restored = ops("restore", created.json()["archive"], "--config", target,
                   env={"QPQ_DB_KEY": db_key_of(source)})
    assert restored.exit_code == 0, restored.stderr

    # Simulate a crash between "files in place" and "purge committed": the state the
    # restore leaves on disk at that moment (pending_purge, key packages still present).
    conn = connect_sqlcipher(target.parent / "qpq.db", Secret(db_key_of(target)))
    conn.execute("UPDATE meta SET value = 'pending_purge' WHERE key = 'restore_state'")
    conn.execute("INSERT INTO key_packages(username, key_package) VALUES ('bob', x'01')")
    conn.close()

    refused = subprocess.run([str(BIN / "qpq-server"), "run", "--config", str(target)],
                             capture_output=True, text=True, timeout=30, env={"PATH": ""})
    assert refused.returncode != 0
    assert "restore is not finished" in refused.stderr + refused.stdout

    doctor_before = ops("restore", "--resume", "--config", target, "--json")
    assert doctor_before.exit_code == 0, doctor_before.stderr
    assert doctor_before.json()["purged_key_packages"] == 1
    assert doctor_before.json()["doctor"]["ok"]
    start_server(target).stop()  # now it starts


def test_resume_without_a_pending_restore_changes_nothing(tmp_path: Path) -> None:
    config = init_data_dir(tmp_path / "d")
    asyncio.run(populate(config, tmp_path / "p", messages=1))
    result = ops("restore", "--resume", "--config", config, "--json")
    assert result.exit_code == 0 and result.json()["purged_key_packages"] == 0


def test_restore_without_an_archive_is_a_usage_error(tmp_path: Path) -> None:
    config = init_data_dir(tmp_path / "d")
    result = ops("restore", "--config", config)
    assert result.exit_code == 64 and "ARCHIVE" in result.stderr
