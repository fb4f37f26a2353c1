"""The post-restore doctor finds what it promises to find."""

from __future__ import annotations

import asyncio
from pathlib import Path

from qpq_ops.backup import run_doctor
from qpq_ops.deployment import load_deployment
from qpq_server.secrets import Secret
from qpq_server.storage.sqlcipher import connect_sqlcipher
from tests.backup.support import add_blob, db_key_of, populate
from tests.helpers.server import init_data_dir


def test_doctor_reports_wrong_types_missing_setups_and_broken_blobs(tmp_path: Path) -> None:
    config = init_data_dir(tmp_path / "d")
    asyncio.run(populate(config, tmp_path / "p", messages=1))
    data = config.parent
    key = Secret(db_key_of(config))
    dep = load_deployment(config)
    healthy = run_doctor(dep, key)
    assert healthy.ok, healthy.checks

    conn = connect_sqlcipher(data / "qpq.db", key)
    conn.execute("INSERT INTO messages(recipient, sender, payload, sent_at)"
                 " VALUES ('bob', 'alice', 'text, not a blob', 1.0)")
    conn.execute("UPDATE accounts SET setup_version = 7 WHERE username = 'alice'")
    conn.close()
    orphan = add_blob(data, b"attachment")
    (data / "blobs" / orphan[:2] / orphan[2:4] / orphan).unlink()  # .meta without content

    report = {c.name: c for c in run_doctor(dep, key).checks}
    assert not report["rows decode"].ok
    assert "messages.payload: 1 rows of the wrong type" in report["rows decode"].detail
    assert not report["OPAQUE setups"].ok
    assert "opaque/setup-v7.bin, which is missing" in report["OPAQUE setups"].detail
    assert not report["blobs present"].ok
    assert f"blob {orphan} has no content file" in report["blobs present"].detail
    assert report["database opens"].ok and report["integrity"].ok


def test_doctor_with_the_wrong_key_says_the_database_does_not_open(tmp_path: Path) -> None:
    config = init_data_dir(tmp_path / "d")
    asyncio.run(populate(config, tmp_path / "p", messages=0))
    report = run_doctor(load_deployment(config), Secret("00" * 32))
    assert not report.ok
    [check] = report.checks
    assert check.name == "database opens" and "does not open" in check.detail
