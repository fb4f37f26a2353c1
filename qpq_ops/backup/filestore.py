"""The `file` storage backend (`[storage] backend = "file"`) in backups and restores.

Its tree (docs/storage-backends.md) is archived file by file under `data/store/`. Every
record there is written to a temp name, fsynced and renamed, so each file read is whole;
a message acknowledged before the copy started is in the archive unless it was delivered
(deleted) meanwhile. `counters` is archived last so its high-water marks cover every id
copied before it. The restore's state and purge go through the server's own
`FileStorage` (which also takes the store's flock, so no server can be using it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from qpq_ops.errors import OpsError
from qpq_server.errors import StorageError
from qpq_server.storage.base import RESTORE_STATE_KEY
from qpq_server.storage.filestore import FileStorage

__all__ = ["STORE_MEMBER_PREFIX", "counts_from_members", "file_complete_purge", "file_mark_pending",
           "file_restore_state", "store_counts", "store_problems"]

STORE_MEMBER_PREFIX = "data/store"
T = TypeVar("T")
_RECORD_DIRS = {"accounts": "accounts", "key_packages": "keypackages", "messages": "queues"}


def _run(root: Path, fn: Callable[[FileStorage], Awaitable[T]]) -> T:
    """Open the store (taking its lock), run `fn`, close; on a thread of its own so that
    it works whether or not the caller already runs an event loop."""
    result: list[T] = []
    error: list[BaseException] = []

    async def main() -> None:
        store = FileStorage(root, pool_size=2)
        try:
            await store.open()
        except StorageError as exc:
            raise OpsError(f"cannot open the file store {root}: {exc}") from None
        try:
            result.append(await fn(store))
        finally:
            await store.close()

    def thread() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            error.append(exc)

    worker = threading.Thread(target=thread, name="qpq-ops-filestore")
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]


def _record_files(root: Path, top: str) -> list[Path]:
    base = root / top
    return [p for p in base.rglob("*") if p.is_file() and p.name.isdigit()] \
        if top != "accounts" else [p for p in base.glob("u-*") if p.is_file()]


def store_counts(root: Path) -> dict[str, int]:
    return {name: len(_record_files(root, top)) for name, top in _RECORD_DIRS.items()}


def counts_from_members(names: list[str]) -> dict[str, int]:
    """The same counts as `store_counts`, from archived member names (what was copied)."""
    counts = dict.fromkeys(_RECORD_DIRS, 0)
    for name in names:
        parts = name.split("/")
        if parts[:2] != ["data", "store"] or len(parts) < 4:
            continue
        top = parts[2]
        if top == "accounts" and len(parts) == 4 and parts[3].startswith("u-"):
            counts["accounts"] += 1
        elif top in ("keypackages", "queues") and len(parts) == 5 and parts[4].isdigit():
            counts["key_packages" if top == "keypackages" else "messages"] += 1
    return counts


def file_restore_state(root: Path) -> str | None:
    return _run(root, lambda s: s.get_meta(RESTORE_STATE_KEY))


def file_mark_pending(root: Path, archive_name: str) -> None:
    async def mark(store: FileStorage) -> None:
        await store.set_meta(RESTORE_STATE_KEY, "pending_purge")
        await store.set_meta("restored_from", archive_name)

    _run(root, mark)


def file_complete_purge(root: Path) -> int:
    """Delete every one-time key package file, then record the purge as done. A crash
    in between leaves `pending_purge`, and a rerun deletes what is left."""
    async def purge(store: FileStorage) -> int:
        files = _record_files(root, "keypackages")
        for path in files:
            path.unlink(missing_ok=True)
        await store.set_meta(RESTORE_STATE_KEY, "done")
        return len(files)

    return _run(root, purge)


def store_problems(root: Path) -> tuple[int, list[str], dict[int, int]]:
    """(records read, problems, accounts per OPAQUE setup version): every record decodes."""
    problems: list[str] = []
    per_setup: dict[int, int] = {}
    read = 0
    for top in ("accounts", "keypackages", "queues"):
        for path in _record_files(root, top):
            read += 1
            if top == "keypackages":
                continue  # raw key package bytes: nothing to decode
            try:
                record: Any = msgpack.unpackb(path.read_bytes(), raw=False)
            except (ValueError, msgpack.ExtraData, OSError) as exc:
                problems.append(f"{path.relative_to(root)} does not decode: {exc}")
                continue
            if top == "accounts":
                version = record.get("setup_version") if isinstance(record, dict) else None
                if not isinstance(version, int) or not isinstance(
                        record.get("password_file"), bytes):
                    problems.append(f"{path.relative_to(root)}: not an account record")
                    continue
                per_setup[version] = per_setup.get(version, 0) + 1
    return read, problems, per_setup
