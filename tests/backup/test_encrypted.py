"""`--encrypt-to`: archives encrypted to an age recipient, readable by the real `age`
tool and by verify/restore with `--identity`."""

from __future__ import annotations

import asyncio
import io
import os
import re
import subprocess
import tarfile
from pathlib import Path

from tests.backup.support import db_key_of, ops, populate
from tests.helpers.server import init_data_dir


def _keygen(path: Path) -> str:
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True,
                   timeout=30)
    match = re.search(r"age1[0-9a-z]+", path.read_text())
    assert match
    return match.group(0)


def test_encrypted_archive_round_trip_and_interop_with_age(tmp_path: Path) -> None:
    source = init_data_dir(tmp_path / "src")
    asyncio.run(populate(source, tmp_path / "p"))
    recipient = _keygen(tmp_path / "key.txt")
    _keygen(tmp_path / "other.txt")

    created = ops("backup", "create", "--config", source, "--dest", tmp_path / "b",
                  "--no-textfile", "--encrypt-to", recipient, "--json")
    assert created.exit_code == 0, created.stderr
    archive = Path(created.json()["archive"])
    assert re.search(r"-schema\d+\.tar\.age$", archive.name) and created.json()["encrypted"]
    raw = archive.read_bytes()
    assert raw.startswith(b"age-encryption.org/v1\n") and b"manifest.json" not in raw

    plain = subprocess.run(["age", "-d", "-i", str(tmp_path / "key.txt"), str(archive)],
                           capture_output=True, timeout=60, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        assert {"db/qpq.db", "manifest.json"} <= set(tar.getnames())

    no_identity = ops("backup", "verify", archive, "--config", source)
    assert no_identity.exit_code == 64 and "--identity" in no_identity.stderr
    wrong = ops("backup", "verify", archive, "--identity", tmp_path / "other.txt")
    assert wrong.exit_code == 3 and "age identities" in wrong.stderr
    good = ops("backup", "verify", archive, "--config", source, "--identity",
               tmp_path / "key.txt", "--json")
    assert good.exit_code == 0 and good.json()["database_checked"], good.stderr

    truncated = tmp_path / archive.name
    truncated.write_bytes(raw[: len(raw) - 100])
    cut = ops("backup", "verify", truncated, "--identity", tmp_path / "key.txt")
    assert cut.exit_code == 2 and "truncated" in cut.stderr

    listed = ops("backup", "list", tmp_path / "b", "--json").json()["archives"]
    assert listed[0]["encrypted"] is True

    fresh = init_data_dir(tmp_path / "fresh")
    restored = ops("restore", archive, "--config", fresh, "--identity", tmp_path / "key.txt",
                   "--json", env={"QPQ_DB_KEY": db_key_of(source)})
    assert restored.exit_code == 0, restored.stderr
    assert restored.json()["doctor"]["ok"]


def test_an_archive_encrypted_by_the_age_tool_can_be_verified(tmp_path: Path) -> None:
    source = init_data_dir(tmp_path / "src")
    asyncio.run(populate(source, tmp_path / "p", messages=1))
    created = ops("backup", "create", "--config", source, "--dest", tmp_path / "b",
                  "--no-textfile", "--json")
    archive = Path(created.json()["archive"])
    recipient = _keygen(tmp_path / "key.txt")
    encrypted = archive.with_name(archive.name + ".age")
    subprocess.run(["age", "-r", recipient, "-o", str(encrypted), str(archive)], check=True,
                   timeout=60)
    result = ops("backup", "verify", encrypted, "--config", source, "--identity",
                 tmp_path / "key.txt")
    assert result.exit_code == 0, result.stderr


def test_a_bad_recipient_is_a_usage_error(tmp_path: Path) -> None:
    source = init_data_dir(tmp_path / "src")
    result = ops("backup", "create", "--config", source, "--dest", tmp_path / "b",
                 "--no-textfile", "--encrypt-to", "age1notarecipient")
    assert result.exit_code == 64 and "not an age X25519 recipient" in result.stderr
    assert not (tmp_path / "b").exists() or os.listdir(tmp_path / "b") == []
