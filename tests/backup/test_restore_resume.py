"""A restore interrupted before its key-package purge: the server refuses to start until
`qpq-ops restore --resume` finishes the purge."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from qpq_ops.backup.journal import PlaceJournal
from qpq_server.secrets import Secret
from qpq_server.storage.base import RESTORE_JOURNAL
from qpq_server.storage.sqlcipher import connect_sqlcipher
from tests.backup.support import db_key_of, ops, populate, with_database
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


def test_a_restore_journal_blocks_the_server_and_resume_rolls_it_back(tmp_path: Path) -> None:
    """A restore killed while renaming files leaves its journal: the server refuses to
    start on the half-placed data dir; --resume undoes the recorded renames."""
    target = with_database(init_data_dir(tmp_path / "dst"))
    data_dir = target.parent
    kt = data_dir / "kt"
    before = sorted(p.name for p in kt.iterdir())
    journal = PlaceJournal(data_dir, data_dir / "pre-restore-x")
    journal.moving(kt, data_dir / "pre-restore-x" / "kt")
    (data_dir / "pre-restore-x").mkdir()
    kt.rename(data_dir / "pre-restore-x" / "kt")  # killed before the new kt/ came in

    refused = subprocess.run([str(BIN / "qpq-server"), "run", "--config", str(target)],
                             capture_output=True, text=True, timeout=30, env={"PATH": ""})
    assert refused.returncode != 0
    assert "restore --resume" in refused.stderr + refused.stdout

    resumed = ops("restore", "--resume", "--config", target, "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert "rolled back" in resumed.json()["recovered"]
    assert sorted(p.name for p in kt.iterdir()) == before
    assert not (data_dir / RESTORE_JOURNAL).exists()
    assert not (data_dir / "pre-restore-x").exists()  # emptied by the rollback
    start_server(target).stop()  # now it starts
