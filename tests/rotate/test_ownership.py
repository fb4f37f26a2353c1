"""Run as root, qpq-ops gives what it writes to the owner of the data dir (the server's
user), so a rotation or restore never leaves the server unable to read its files."""

from __future__ import annotations

import os
from pathlib import Path

from tests.backup.support import db_key_of, ops, with_database
from tests.helpers.server import init_data_dir

SERVICE_USER = (65534, 65534)  # nobody:nogroup, standing in for the qpq user


def _hand_over(root: Path) -> tuple[int, int]:
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()  # not root: everything stays ours
    for item in [root, *root.rglob("*")]:
        os.chown(item, *SERVICE_USER, follow_symlinks=False)
    return SERVICE_USER


def _owners(paths: list[Path]) -> set[tuple[int, int]]:
    return {(p.stat().st_uid, p.stat().st_gid) for p in paths}


def test_rotations_leave_files_owned_by_the_data_dirs_owner(tmp_path: Path) -> None:
    config = init_data_dir(tmp_path / "d")
    data = config.parent
    owner = _hand_over(data)
    for args in (["auth-token"], ["tls"], ["tls", "--stage"], ["opaque"], ["federation"]):
        result = ops("rotate", *args, "--config", config)
        assert result.exit_code == 0, (args, result.stderr)
    written = [data / ".env", data / "tls" / "cert.pem", data / "tls" / "key.pem",
               data / "tls" / "cert.pem.previous", data / "tls" / "next-key.pem",
               data / "tls" / "trust-bundle.pem", data / "opaque" / "setup-v2.bin",
               data / "federation-key.der", data / "federation-ca-key.der",
               data / "audit" / "rotations.jsonl", data / "audit"]
    assert _owners(written) == {owner}


def test_restore_leaves_the_restored_files_owned_by_the_data_dirs_owner(
        tmp_path: Path) -> None:
    source = with_database(init_data_dir(tmp_path / "src"))
    archive = ops("backup", "create", "--config", source, "--dest", tmp_path / "b",
                  "--no-textfile", "--json").json()["archive"]
    target = init_data_dir(tmp_path / "dst")
    owner = _hand_over(target.parent)
    restored = ops("restore", archive, "--config", target, "--json",
                   env={"QPQ_DB_KEY": db_key_of(source)})
    assert restored.exit_code == 0, restored.stderr
    data = target.parent
    assert _owners([data / "qpq.db", data / "opaque" / "setup-v1.bin",
                    data / "kt" / "signing_key.pem", data / "blobs",
                    Path(restored.json()["aside_dir"])]) == {owner}
