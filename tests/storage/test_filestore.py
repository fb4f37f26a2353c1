"""What only the file backend has: its lock, its crash recovery, its on-disk layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpq_server.errors import StorageError
from qpq_server.storage.filestore import FileStorage


async def test_second_open_of_the_same_dir_is_refused_until_the_first_closes(
        tmp_path: Path) -> None:
    first = FileStorage(tmp_path / "store")
    await first.open()
    second = FileStorage(tmp_path / "store")
    try:
        with pytest.raises(StorageError, match="in use by another qpq-server"):
            await second.open()
    finally:
        await first.close()
    await second.open()  # released on close
    await second.close()


async def test_torn_kt_tail_from_a_crash_is_cut_off(tmp_path: Path) -> None:
    s = FileStorage(tmp_path / "store")
    await s.open()
    await s.create_account("a", b"pf", 1, 1.0)
    await s.publish_identity_key("a", b"A" * 32, b"leaf-0", 1.0)
    await s.close()
    leaves = tmp_path / "store" / "kt" / "leaves"
    with leaves.open("ab") as f:
        f.write(b"\x00\x00\x01\x00partial")  # a record header promising 256 bytes
    s = FileStorage(tmp_path / "store")
    await s.open()
    try:
        assert [x.leaf for x in await s.kt_leaves()] == [b"leaf-0"]
        assert await s.publish_identity_key("a", b"B" * 32, b"leaf-1", 2.0) == 1
        assert [x.leaf for x in await s.kt_leaves()] == [b"leaf-0", b"leaf-1"]
    finally:
        await s.close()


async def test_no_temp_files_are_left_after_writes(tmp_path: Path) -> None:
    s = FileStorage(tmp_path / "store")
    await s.open()
    await s.create_account("a", b"pf", 1, 1.0)
    await s.add_key_packages("a", [b"1", b"2"])
    await s.enqueue("a", ["a"], b"m", 1.0)
    await s.set_meta("x", "y")
    await s.close()
    leftovers = [p for p in (tmp_path / "store").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert (tmp_path / "store" / "queues" / "u-a").is_dir()


async def test_names_with_path_syntax_never_reach_the_filesystem(tmp_path: Path) -> None:
    s = FileStorage(tmp_path / "store")
    await s.open()
    try:
        for name in ("../escape", "a/b", ""):
            with pytest.raises(StorageError):
                await s.create_account(name, b"pf", 1, 1.0)
        assert not (tmp_path / "escape").exists()
    finally:
        await s.close()
