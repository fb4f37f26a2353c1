"""What a restore replaces and what it keeps, and verify's scratch dir."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.backup.support import db_key_of, ops, with_database
from tests.helpers.server import init_data_dir


def test_restore_keeps_the_kt_key_here_when_the_archive_has_none(tmp_path: Path) -> None:
    source = with_database(init_data_dir(tmp_path / "src"))
    shutil.rmtree(source.parent / "kt")  # an archive made without a KT key
    created = ops("backup", "create", "--config", source, "--dest", tmp_path / "b",
                  "--no-textfile", "--json")
    assert created.exit_code == 0, created.stderr
    fresh = init_data_dir(tmp_path / "fresh")
    kt_key = (fresh.parent / "kt" / "signing_key.pem").read_bytes()
    restored = ops("restore", created.json()["archive"], "--config", fresh, "--json",
                   env={"QPQ_DB_KEY": db_key_of(source)})
    assert restored.exit_code == 0, restored.stderr
    assert (fresh.parent / "kt" / "signing_key.pem").read_bytes() == kt_key


def test_with_secrets_brings_back_the_env_and_tls_and_moves_the_old_ones_aside(
        tmp_path: Path) -> None:
    source = with_database(init_data_dir(tmp_path / "src"))
    # federation certificates in the data dir, as `rotate federation` keeps them there
    assert ops("rotate", "federation", "--config", source).exit_code == 0
    created = ops("backup", "create", "--config", source, "--dest", tmp_path / "b",
                  "--no-textfile", "--include-secrets", "--json")
    assert created.exit_code == 0 and created.json()["includes_secrets"]
    archive = created.json()["archive"]
    assert archive.endswith("-with-secrets.tar")
    fresh = init_data_dir(tmp_path / "fresh")
    old_env = (fresh.parent / ".env").read_text()
    restored = ops("restore", archive, "--config", fresh, "--with-secrets", "--json")
    assert restored.exit_code == 0, restored.stderr
    report = restored.json()
    assert report["secrets_restored"] and not report["rekeyed"]
    for name in (".env", "tls/cert.pem", "tls/key.pem", "keys/session.key",
                 "federation-cert.der", "federation-key.der", "federation-ca.der",
                 "federation-ca-key.der"):
        assert (fresh.parent / name).read_bytes() == (source.parent / name).read_bytes()
    assert (Path(report["aside_dir"]) / ".env").read_text() == old_env

    plain = ops("backup", "create", "--config", source, "--dest", tmp_path / "plain",
                "--no-textfile", "--json").json()["archive"]
    refused = ops("restore", plain, "--config", init_data_dir(tmp_path / "third"),
                  "--with-secrets")
    assert refused.exit_code == 64 and "holds no secrets" in refused.stderr


def test_verify_uses_the_given_work_dir_and_leaves_it_clean(tmp_path: Path) -> None:
    source = with_database(init_data_dir(tmp_path / "src"))
    archive = ops("backup", "create", "--config", source, "--dest", tmp_path / "b",
                  "--no-textfile", "--json").json()["archive"]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = ops("backup", "verify", archive, "--config", source, "--work-dir", scratch)
    assert result.exit_code == 0, result.stderr
    assert list(scratch.iterdir()) == []
    missing = ops("backup", "verify", tmp_path / "absent.tar")
    assert missing.exit_code == 64 and "not found" in missing.stderr


def test_a_textfile_dir_that_cannot_be_written_is_a_warning_not_a_lost_backup(
        tmp_path: Path) -> None:
    source = with_database(init_data_dir(tmp_path / "src"))
    not_a_dir = tmp_path / "metrics"
    not_a_dir.write_text("a file where the collector dir should be")
    result = ops("backup", "create", "--config", source, "--dest", tmp_path / "b",
                 "--textfile-dir", not_a_dir, "--json")
    assert result.exit_code == 1
    assert "stale-backup alert will fire" in result.json()["warnings"][0]
    assert Path(result.json()["archive"]).is_file()
