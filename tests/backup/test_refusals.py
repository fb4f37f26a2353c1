"""Bad archives, bad keys, a full disk, a running server, a non-empty data dir, another
schema: each refused with one clear line, and the existing data left exactly as it was."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qpq_ops.backup.manifest import archive_prefix
from qpq_server.secrets import Secret
from qpq_server.storage.migrations import MIGRATIONS
from qpq_server.storage.sqlcipher import connect_sqlcipher
from tests.backup.support import add_blob, blob_member, db_key_of, ops, populate, tree_digest
from tests.helpers.server import init_data_dir, start_server

QPQ_OPS = str(Path(sys.executable).parent / "qpq-ops")


@dataclass(frozen=True)
class Setup:
    source: Path     # config of the backed-up deployment
    archive: Path
    blob: str
    target: Path     # config of a deployment holding other data (restore target)
    key: str         # DB key of the archive


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("refusals")
    source = init_data_dir(base / "source")
    blob = add_blob(source.parent, b"an encrypted attachment")
    asyncio.run(populate(source, base / "profiles"))
    created = ops("backup", "create", "--config", source, "--dest", base / "backups",
                  "--no-textfile", "--json")
    assert created.exit_code == 0, created.stderr
    target = init_data_dir(base / "target")
    asyncio.run(populate(target, base / "profiles-target", messages=1))
    yield Setup(source, Path(created.json()["archive"]), blob, target, db_key_of(source))


def _copy(archive: Path, tmp_path: Path) -> Path:
    dest = tmp_path / archive.name
    shutil.copy(archive, dest)
    return dest


def _rewrite(archive: Path, tmp_path: Path, drop: str = "", edit_manifest: bool = False,
             extra: tuple[str, bytes] | None = None) -> Path:
    """A copy of the archive with one member dropped, the manifest edited or one added."""
    dest = tmp_path / archive.name
    with tarfile.open(archive) as src, tarfile.open(dest, "w") as out:
        for info in src:
            data = src.extractfile(info).read()  # type: ignore[union-attr]
            if info.name == drop:
                continue
            if info.name == "manifest.json" and edit_manifest:
                manifest = json.loads(data)
                manifest["row_counts"]["messages"] += 1
                data = json.dumps(manifest).encode()
                info.size = len(data)
            if info.name == "manifest.json" and extra:
                extra_info = tarfile.TarInfo(extra[0])
                extra_info.size = len(extra[1])
                out.addfile(extra_info, io.BytesIO(extra[1]))
            out.addfile(info, io.BytesIO(data))
    return dest


def _assert_refused_untouched(setup: Setup, archive: Path, code: int, message: str,
                              env: dict[str, str] | None = None) -> None:
    before = tree_digest(setup.target.parent)
    result = ops("restore", archive, "--config", setup.target, "--force",
                 env=env or {"QPQ_DB_KEY": setup.key})
    assert result.exit_code == code, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert tree_digest(setup.target.parent) == before
    assert not [p for p in setup.target.parent.iterdir()
                if p.name.startswith((".qpq-restore", "pre-restore"))]


def test_verify_passes_a_good_archive_and_says_when_it_had_no_key(setup: Setup) -> None:
    good = ops("backup", "verify", setup.archive, "--config", setup.source, "--json")
    assert good.exit_code == 0, good.stderr
    assert good.json()["database_checked"] and good.json()["problems"] == []
    no_key = ops("backup", "verify", setup.archive, "--json")
    assert no_key.exit_code == 1 and no_key.json()["database_checked"] is False


def test_tampered_archive_is_refused(setup: Setup, tmp_path: Path) -> None:
    bad = _copy(setup.archive, tmp_path)
    with tarfile.open(bad) as tar:
        offset = tar.getmember("db/qpq.db").offset_data + 5000
    with bad.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))
    result = ops("backup", "verify", bad, "--config", setup.source)
    assert result.exit_code == 2 and "checksum mismatch in db/qpq.db" in result.stderr
    _assert_refused_untouched(setup, bad, 2, "checksum mismatch in db/qpq.db")


def test_edited_manifest_is_caught_by_its_mac(setup: Setup, tmp_path: Path) -> None:
    bad = _rewrite(setup.archive, tmp_path, edit_manifest=True)
    result = ops("backup", "verify", bad, "--config", setup.source)
    assert result.exit_code == 2 and "manifest MAC does not match" in result.stderr
    _assert_refused_untouched(setup, bad, 2, "manifest MAC")


def test_truncated_archive_is_refused(setup: Setup, tmp_path: Path) -> None:
    bad = _copy(setup.archive, tmp_path)
    os.truncate(bad, bad.stat().st_size // 2)
    result = ops("backup", "verify", bad, "--config", setup.source)
    assert result.exit_code == 2 and "truncated" in result.stderr
    _assert_refused_untouched(setup, bad, 2, "truncated")


def test_wrong_key_is_refused(setup: Setup) -> None:
    wrong = {"QPQ_DB_KEY": "ab" * 32}
    result = ops("backup", "verify", setup.archive, env=wrong)
    assert result.exit_code == 3 and "not the one this archive was made with" in result.stderr
    _assert_refused_untouched(setup, setup.archive, 3, "not the one this archive", env=wrong)


def test_missing_blob_is_refused(setup: Setup, tmp_path: Path) -> None:
    member = blob_member(setup.blob)
    bad = _rewrite(setup.archive, tmp_path, drop=member)
    result = ops("backup", "verify", bad, "--config", setup.source)
    assert result.exit_code == 2 and f"missing blob {member}" in result.stderr
    _assert_refused_untouched(setup, bad, 2, "missing blob")


def test_member_with_an_unsafe_path_is_refused(setup: Setup, tmp_path: Path) -> None:
    bad = _rewrite(setup.archive, tmp_path, extra=("../escape", b"x"))
    _assert_refused_untouched(setup, bad, 2, "unsafe path")
    assert not (setup.target.parent.parent / "escape").exists()


def test_full_destination_leaves_no_partial_backup(setup: Setup, tmp_path: Path) -> None:
    dest, textfiles = tmp_path / "small", tmp_path / "tf"
    source_before = tree_digest(setup.source.parent)

    def limit_file_size() -> None:  # a size-limited disk: writes past 32 KB fail (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))

    result = subprocess.run(
        [QPQ_OPS, "backup", "create", "--config", str(setup.source), "--dest", str(dest),
         "--textfile-dir", str(textfiles)], capture_output=True, text=True, timeout=60,
        preexec_fn=limit_file_size,
        env={k: v for k, v in os.environ.items() if not k.startswith("QPQ_")})
    assert result.returncode == 3, result.stderr
    assert "is full" in result.stderr and "no backup was written" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(dest.iterdir()) == []
    assert not (textfiles / "qpq_backup.prom").exists()
    assert tree_digest(setup.source.parent) == source_before


def test_temp_files_of_a_killed_backup_are_cleaned_by_the_next_one(
        setup: Setup, tmp_path: Path) -> None:
    dest = tmp_path / "b"
    dest.mkdir()
    stale = [dest / ".qpq-backup-999999999-1.partial", dest / ".qpq-backup-999999999-1.db"]
    mine = dest / f".qpq-backup-{os.getpid()}-1.partial"  # a live process's: kept
    for path in (*stale, mine):
        path.write_bytes(b"half a backup")
    result = ops("backup", "create", "--config", setup.source, "--dest", dest,
                 "--no-textfile")
    assert result.exit_code == 0, result.stderr
    assert not any(p.exists() for p in stale) and mine.exists()


def test_restore_over_a_running_server_is_refused(setup: Setup) -> None:
    srv = start_server(setup.target)
    try:
        db_before = (setup.target.parent / "qpq.db").read_bytes()
        result = ops("restore", setup.archive, "--config", setup.target, "--force",
                     env={"QPQ_DB_KEY": setup.key})
        assert result.exit_code == 64 and "is running" in result.stderr
        assert (setup.target.parent / "qpq.db").read_bytes() == db_before
        assert not list(setup.target.parent.glob("pre-restore-*"))
    finally:
        srv.stop()


def test_restore_into_a_data_dir_with_data_needs_force_and_keeps_the_old_data(
        setup: Setup, tmp_path: Path) -> None:
    target = init_data_dir(tmp_path / "t")
    asyncio.run(populate(target, tmp_path / "p", messages=1))
    before = tree_digest(target.parent)
    refused = ops("restore", setup.archive, "--config", target, env={"QPQ_DB_KEY": setup.key})
    assert refused.exit_code == 64 and "already holds data" in refused.stderr
    assert tree_digest(target.parent) == before
    forced = ops("restore", setup.archive, "--config", target, "--force", "--json",
                 env={"QPQ_DB_KEY": setup.key})
    assert forced.exit_code == 0, forced.stderr
    aside = Path(forced.json()["aside_dir"])
    assert aside.parent == target.parent
    assert tree_digest(aside)["qpq.db"] == before["qpq.db"]  # the old database, unchanged
    assert tree_digest(aside)["opaque/setup-v1.bin"] == before["opaque/setup-v1.bin"]


def test_archive_of_another_schema_needs_force_then_migrates(tmp_path: Path) -> None:
    old = init_data_dir(tmp_path / "old")
    key = db_key_of(old)
    conn = connect_sqlcipher(old.parent / "qpq.db", Secret(key))
    for statement in MIGRATIONS[0].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    created = ops("backup", "create", "--config", old, "--dest", tmp_path / "b",
                  "--no-textfile", "--json")
    assert created.exit_code == 0, created.stderr
    archive = Path(created.json()["archive"])
    assert archive.name.endswith("-schema1.tar")
    fresh = init_data_dir(tmp_path / "fresh")
    refused = ops("restore", archive, "--config", fresh, env={"QPQ_DB_KEY": key})
    assert refused.exit_code == 64 and "pass --force" in refused.stderr
    forced = ops("restore", archive, "--config", fresh, "--force", "--json",
                 env={"QPQ_DB_KEY": key})
    assert forced.exit_code == 0, forced.stderr
    assert forced.json()["migrated_from"] == 1
    start_server(fresh).stop()  # the migrated, restored data dir serves


def test_a_backup_in_the_same_second_as_another_gets_its_own_name(
        setup: Setup, tmp_path: Path) -> None:
    """Names have one-second resolution: a backup right after another (a rotation rerun
    after a killed one) waits for a free second instead of being refused."""
    dest = tmp_path / "b"
    dest.mkdir()
    first = ops("backup", "create", "--config", setup.source, "--dest", dest, "--no-textfile",
                "--json")
    assert first.exit_code == 0, first.stderr
    made = Path(first.json()["archive"])
    # Archives named after this second and the next, as a run just before would leave.
    now = dt.datetime.now(dt.UTC)
    taken = []
    for ahead in (0, 1):
        stamp = archive_prefix(now + dt.timedelta(seconds=ahead))
        taken.append(dest / (stamp + made.name.split("-", 3)[3]))
        if taken[-1] != made:
            shutil.copy2(made, taken[-1])
    again = ops("backup", "create", "--config", setup.source, "--dest", dest, "--no-textfile",
                "--json")
    assert again.exit_code == 0, again.stderr
    assert Path(again.json()["archive"]) not in [*taken, made]
    assert all(p.exists() for p in taken)
