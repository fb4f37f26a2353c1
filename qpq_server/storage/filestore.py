"""File storage backend (`[storage] backend = "file"`): plain files, no database.

Layout under DATA_DIR/<[storage] file_dir> (default `store/`)::

    LOCK                        flock()ed while a server uses the dir (one server only)
    counters                    msgpack: reserved id high-water marks
    meta                        msgpack: meta key/values
    accounts/u-NAME             msgpack: one account record
    keypackages/u-NAME/ID       one file per one-time key package
    queues/u-NAME/ID            one file per queued message (msgpack)
    kt/leaves                   append-only key-transparency records (4-byte length + msgpack)
    relays/o-DOMAIN/ID          federation relay ids delivered (msgpack); while one still
                                holds the message it is a journal entry, replayed at open

Every change is durable before it is acknowledged: files are written to a temp name,
fsynced, renamed into place, and the directory is fsynced; the KT log is appended and
fsynced (a torn tail from a crash is cut off at the next open). Ids are 20-digit
zero-padded so a directory listing sorts in id order; they are reserved in blocks in
`counters` (one extra fsync per 1,024 ids) so ids never repeat across restarts.

All file work runs on worker threads: one writer thread (so read-modify-write steps
such as taking a one-time key package are atomic) and `pool_size` reader threads.
Nothing here encrypts: the files hold what clients already encrypted end to end, plus
account names, password files (OPAQUE records) and public keys in the clear.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from qpq_server.errors import StorageError, UserExists
from qpq_server.fsutil import fsync_dir, write_atomic
from qpq_server.storage.base import (
    Account,
    CommitObserver,
    Expected,
    KeyPackage,
    KtLeaf,
    StoredMessage,
    device_set_changed,
)

__all__ = ["FileStorage"]

T = TypeVar("T")
_ID_BLOCK = 1024
_RECORD = struct.Struct(">I")
_FORMAT = 1


def _pack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def _user_dir_name(username: str) -> str:
    # The prefix keeps names such as "." and ".." (valid usernames) from meaning anything.
    # The service only passes names matching USERNAME_RE; refuse path syntax regardless.
    if not username or "/" in username or "\0" in username:
        raise StorageError(f"username {username!r} cannot name a file")
    return "u-" + username


def _ids(directory: Path) -> list[int]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names if n.isdigit())


class FileStorage:
    def __init__(self, root: Path, *, pool_size: int = 4,
                 on_commit: CommitObserver | None = None) -> None:
        self._root = root
        self._readers = max(1, pool_size - 1)
        self._on_commit = on_commit
        self._lock_fd: int | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._counters: dict[str, int] = {}
        self._next: dict[str, int] = {}
        self._meta: dict[str, str] = {}
        self._depth = 0
        self._usage: dict[str, int] = {}  # queue file bytes per mailbox (the quota's)
        self._kt_count = 0
        self._kt_bytes = 0

    # -- paths -------------------------------------------------------------------------
    def _account_path(self, username: str) -> Path:
        return self._root / "accounts" / _user_dir_name(username)

    def _packages_dir(self, username: str) -> Path:
        return self._root / "keypackages" / _user_dir_name(username)

    def _queue_dir(self, username: str) -> Path:
        return self._root / "queues" / _user_dir_name(username)

    @property
    def _kt_path(self) -> Path:
        return self._root / "kt" / "leaves"

    # -- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="qpq-file-write")
        self._pool = ThreadPoolExecutor(self._readers, thread_name_prefix="qpq-file-read")

    def _open_sync(self) -> None:
        self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_path = self._root / "LOCK"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(
                f"storage dir {self._root} is in use by another qpq-server "
                f"(lock {lock_path} is held)"
            ) from None
        self._lock_fd = fd
        try:
            for sub in ("accounts", "keypackages", "queues", "kt", "relays"):
                (self._root / sub).mkdir(mode=0o700, exist_ok=True)
            fsync_dir(self._root)
            self._load_state()
        except BaseException:
            self._unlock()
            raise

    def _load_state(self) -> None:
        counters_path = self._root / "counters"
        if counters_path.exists():
            counters = _unpack(counters_path.read_bytes())
            if counters.get("format") != _FORMAT:
                raise StorageError(f"{counters_path}: unknown storage format "
                                   f"{counters.get('format')!r}")
            self._counters = {k: int(v) for k, v in counters.items() if k != "format"}
        meta_path = self._root / "meta"
        self._meta = dict(_unpack(meta_path.read_bytes())) if meta_path.exists() else {}
        self._finish_relays()
        depth, highest = 0, 0
        self._usage = {}
        for queue in (self._root / "queues").iterdir():
            ids = _ids(queue)
            depth += len(ids)
            highest = max([highest, *ids])
            # The quota's per-mailbox total: counted once here, then kept by the writer.
            self._usage[queue.name.removeprefix("u-")] = sum(
                (queue / f"{i:020d}").stat().st_size for i in ids)
        self._depth = depth
        # Start after every id that may have been handed out (a whole reserved block).
        self._counters["message"] = max(self._counters.get("message", 1), highest + 1)
        self._counters.setdefault("key_package", 1)
        self._next = dict(self._counters)
        self._write_counters()
        self._kt_count, self._kt_bytes = self._recover_kt()

    def _relay_path(self, origin: str, relay_id: int) -> Path:
        return self._root / "relays" / _user_dir_name(origin).replace("u-", "o-", 1) \
            / f"{relay_id:020d}"

    def _finish_relays(self) -> None:
        """A crash between a relay's journal entry and its end: write the message again
        (same id, same file) and close the entry, so it is delivered exactly once."""
        for origin in (self._root / "relays").iterdir():
            for relay_id in _ids(origin):
                path = origin / f"{relay_id:020d}"
                record = _unpack(path.read_bytes())
                if "payload" in record:
                    self._commit_relay(path, record)

    def _commit_relay(self, marker: Path, record: dict[str, Any]) -> int:
        """Write the relayed message into each queue; its file size, per queue."""
        body = _pack({"sender": record["sender"], "payload": record["payload"],
                      "sent_at": record["sent_at"]})
        for recipient, message_id in zip(record["recipients"], record["ids"], strict=True):
            directory = self._queue_dir(recipient)
            if not directory.exists():
                directory.mkdir(mode=0o700)
                fsync_dir(directory.parent)
            write_atomic(directory / f"{message_id:020d}", body)
        write_atomic(marker, _pack({"ids": record["ids"], "seen_at": record["sent_at"]}))
        return len(body)

    def _recover_kt(self) -> tuple[int, int]:
        """Count whole records; cut off a torn tail left by a crash mid-append."""
        if not self._kt_path.exists():
            return 0, 0
        data = self._kt_path.read_bytes()
        count, offset = 0, 0
        while offset + _RECORD.size <= len(data):
            (length,) = _RECORD.unpack_from(data, offset)
            if offset + _RECORD.size + length > len(data):
                break
            offset += _RECORD.size + length
            count += 1
        if offset != len(data):
            with open(self._kt_path, "r+b") as f:
                f.truncate(offset)
                os.fsync(f.fileno())
        return count, offset

    def _write_counters(self) -> None:
        write_atomic(self._root / "counters", _pack({"format": _FORMAT, **self._counters}))

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    async def close(self) -> None:
        for pool in (self._writer, self._pool):
            if pool is not None:
                await asyncio.to_thread(pool.shutdown, True)
        self._writer = self._pool = None
        self._unlock()

    # -- plumbing ----------------------------------------------------------------------
    async def _write(self, fn: Callable[[], T]) -> T:
        if self._writer is None:
            raise StorageError("storage is closed")

        def timed() -> T:
            started = time.perf_counter()
            result = fn()
            if self._on_commit is not None:
                self._on_commit(time.perf_counter() - started)
            return result

        return await asyncio.get_running_loop().run_in_executor(self._writer, timed)

    async def _read(self, fn: Callable[[], T]) -> T:
        if self._pool is None:
            raise StorageError("storage is closed")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def _new_id(self, kind: str) -> int:
        """Hand out the next id; reserve (durably) a new block when one runs out."""
        value = self._next[kind]
        if value >= self._counters[kind]:
            self._counters[kind] = value + _ID_BLOCK
            self._write_counters()
        self._next[kind] = value + 1
        return value

    def _read_account(self, username: str) -> dict[str, Any] | None:
        try:
            data = self._account_path(username).read_bytes()
        except FileNotFoundError:
            return None
        record: dict[str, Any] = _unpack(data)
        return record

    def _update_account(self, username: str, **changes: Any) -> None:
        record = self._read_account(username)
        if record is None:
            raise StorageError(f"no account {username!r}")
        record.update(changes)
        write_atomic(self._account_path(username), _pack(record))

    # -- accounts ----------------------------------------------------------------------
    async def create_account(self, username: str, password_file: bytes, setup_version: int,
                             now: float) -> None:
        def run() -> None:
            path = self._account_path(username)
            if path.exists():
                raise UserExists(f"username {username!r} is taken")
            write_atomic(path, _pack({"password_file": password_file,
                                      "setup_version": setup_version,
                                      "identity_key": None, "created_at": now}))

        await self._write(run)

    async def get_account(self, username: str) -> Account | None:
        def run() -> Account | None:
            r = self._read_account(username)
            if r is None:
                return None
            return Account(username, r["password_file"], int(r["setup_version"]),
                           r["identity_key"], float(r["created_at"]))

        return await self._read(run)

    async def account_with_meta(self, username: str,
                                key: str) -> tuple[Account | None, str | None]:
        return await self.get_account(username), await self.get_meta(key)

    async def update_password_file(self, username: str, password_file: bytes,
                                   setup_version: int) -> None:
        await self._write(lambda: self._update_account(
            username, password_file=password_file, setup_version=setup_version))

    async def existing_users(self, usernames: Sequence[str]) -> set[str]:
        names = list(dict.fromkeys(usernames))
        return await self._read(
            lambda: {n for n in names if self._account_path(n).exists()}) if names else set()

    def _check_expected(self, username: str, expected: Expected | None) -> None:
        """The compare of a compare-and-set (on the one writer thread: nothing can change
        the account between it and the write)."""
        record = self._read_account(username)
        if expected is not None and record is not None and \
                record.get("identity_key") != expected.identity_key:
            raise device_set_changed(username)

    async def set_identity_key(self, username: str, identity_key: bytes,
                               expected: Expected | None = None) -> None:
        def run() -> None:
            self._check_expected(username, expected)
            self._update_account(username, identity_key=identity_key)

        await self._write(run)

    async def publish_identity_key(self, username: str, identity_key: bytes, kt_leaf: bytes,
                                   now: float, expected: Expected | None = None) -> int:
        def run() -> int:
            if self._read_account(username) is None:
                raise StorageError(f"no account {username!r} to publish a key for")
            self._check_expected(username, expected)
            # Log first: a crash in between leaves a logged publication that did not take
            # effect (harmless), never a served key the log does not show.
            index = self._append_kt(username, kt_leaf, now)
            self._update_account(username, identity_key=identity_key)
            return index

        return await self._write(run)

    def _append_kt(self, username: str, leaf: bytes, now: float) -> int:
        body = _pack([username, leaf, now])
        record = _RECORD.pack(len(body)) + body
        new_file = not self._kt_path.exists()
        with open(self._kt_path, "ab") as f:
            f.write(record)
            f.flush()
            os.fsync(f.fileno())
        if new_file:
            fsync_dir(self._kt_path.parent)
        self._kt_bytes += len(record)
        self._kt_count += 1
        return self._kt_count - 1

    async def kt_leaves(self, start: int = 0) -> list[KtLeaf]:
        def run(limit: int) -> list[KtLeaf]:
            if limit == 0:
                return []
            with open(self._kt_path, "rb") as f:
                data = f.read(limit)
            leaves, offset, index = [], 0, 0
            while offset < len(data):
                (length,) = _RECORD.unpack_from(data, offset)
                if index >= start:
                    username, leaf, created_at = _unpack(
                        data[offset + _RECORD.size : offset + _RECORD.size + length])
                    leaves.append(KtLeaf(index, username, leaf, float(created_at)))
                offset += _RECORD.size + length
                index += 1
            return leaves

        limit = self._kt_bytes  # only records whose append has completed
        return await self._read(lambda: run(limit))

    # -- key packages ------------------------------------------------------------------
    async def add_key_packages(self, username: str, packages: Sequence[bytes]) -> int:
        def run() -> int:
            directory = self._packages_dir(username)
            directory.mkdir(mode=0o700, exist_ok=True)
            for package in packages:
                path = directory / f"{self._new_id('key_package'):020d}"
                write_atomic(path, package, sync_dir=False)
            fsync_dir(directory)
            return len(_ids(directory))

        return await self._write(run)

    async def take_key_package(self, username: str, prefix: bytes = b"") -> KeyPackage | None:
        def run() -> KeyPackage | None:
            directory = self._packages_dir(username)
            for package_id in _ids(directory):
                path = directory / f"{package_id:020d}"
                data = path.read_bytes()
                if data.startswith(prefix):
                    path.unlink()
                    fsync_dir(directory)
                    return KeyPackage(package_id, data)
            return None

        return await self._write(run)

    async def count_key_packages(self, username: str, prefix: bytes = b"") -> int:
        def run() -> int:
            directory = self._packages_dir(username)
            if not prefix:
                return len(_ids(directory))
            return sum(1 for i in _ids(directory)
                       if (directory / f"{i:020d}").read_bytes().startswith(prefix))

        return await self._read(run)

    # -- delivery ----------------------------------------------------------------------
    async def enqueue(self, sender: str, recipients: Sequence[str], payload: bytes,
                      now: float) -> list[int]:
        def run() -> list[int]:
            ids, dirs = [], []
            body = _pack({"sender": sender, "payload": payload, "sent_at": now})
            for recipient in recipients:
                directory = self._queue_dir(recipient)
                if not directory.exists():
                    directory.mkdir(mode=0o700)
                    fsync_dir(directory.parent)
                message_id = self._new_id("message")
                write_atomic(directory / f"{message_id:020d}", body, sync_dir=False)
                ids.append(message_id)
                dirs.append(directory)
                self._usage[recipient] = self._usage.get(recipient, 0) + len(body)
            for directory in dict.fromkeys(dirs):
                fsync_dir(directory)
            self._depth += len(ids)
            return ids

        return await self._write(run)

    async def fetch(self, recipient: str, limit: int,
                    max_bytes: int | None = None) -> list[StoredMessage]:
        def run() -> list[StoredMessage]:
            directory = self._queue_dir(recipient)
            messages: list[StoredMessage] = []
            total = 0
            for message_id in _ids(directory):
                try:
                    record = _unpack((directory / f"{message_id:020d}").read_bytes())
                except FileNotFoundError:
                    continue  # acked meanwhile
                total += len(record["payload"])
                if messages and max_bytes is not None and total > max_bytes:
                    break
                messages.append(StoredMessage(message_id, recipient, record["sender"],
                                              record["payload"], float(record["sent_at"])))
                if len(messages) >= limit:
                    break
            return messages

        return await self._read(run)

    async def mailbox_bytes(self, recipients: Sequence[str]) -> dict[str, int]:
        # Queue file bytes: they bound the payload bytes closely (a small msgpack header).
        # Kept by the single writer thread; a dict read is atomic, no thread hop needed.
        usage = self._usage
        return {r: usage[r] for r in dict.fromkeys(recipients) if usage.get(r, 0) > 0}

    async def ack(self, recipient: str, message_ids: Sequence[int]) -> int:
        ids = list(dict.fromkeys(message_ids))

        def run() -> int:
            directory = self._queue_dir(recipient)
            deleted = 0
            for message_id in ids:
                path = directory / f"{message_id:020d}"
                with contextlib.suppress(FileNotFoundError):
                    size = path.stat().st_size
                    path.unlink()
                    deleted += 1
                    self._usage[recipient] = self._usage.get(recipient, 0) - size
            if deleted:
                fsync_dir(directory)
                self._depth -= deleted
            return deleted

        return await self._write(run) if ids else 0

    async def mailbox_count(self, recipient: str) -> int:
        return await self._read(lambda: len(_ids(self._queue_dir(recipient))))

    async def enqueue_relayed(self, origin: str, relay_id: int, sender: str,
                              recipients: Sequence[str], payload: bytes,
                              now: float) -> list[int] | None:
        def run() -> list[int] | None:
            marker = self._relay_path(origin, relay_id)
            if marker.exists():
                return None
            if not marker.parent.exists():
                marker.parent.mkdir(mode=0o700)
                fsync_dir(marker.parent.parent)
            ids = [self._new_id("message") for _ in recipients]
            record = {"ids": ids, "recipients": list(recipients), "sender": sender,
                      "payload": payload, "sent_at": now}
            write_atomic(marker, _pack(record))  # the journal entry: replayed at open
            body_bytes = self._commit_relay(marker, record)
            self._depth += len(ids)
            for recipient in recipients:
                self._usage[recipient] = self._usage.get(recipient, 0) + body_bytes
            return ids

        return await self._write(run)

    async def forget_relays(self, before: float) -> int:
        def run() -> int:
            forgotten = 0
            for origin in (self._root / "relays").iterdir():
                for relay_id in _ids(origin):
                    path = origin / f"{relay_id:020d}"
                    if float(_unpack(path.read_bytes()).get("seen_at", before)) < before:
                        path.unlink()
                        forgotten += 1
            return forgotten

        return await self._write(run)

    async def queue_depth(self) -> int:
        return self._depth

    # -- metadata ----------------------------------------------------------------------
    async def get_meta(self, key: str) -> str | None:
        return self._meta.get(key)

    async def meta_with_prefix(self, prefix: str) -> dict[str, str]:
        return {k: v for k, v in self._meta.items() if k.startswith(prefix)}

    async def set_meta(self, key: str, value: str) -> None:
        def run() -> None:
            meta = {**self._meta, key: value}
            write_atomic(self._root / "meta", _pack(meta))
            self._meta = meta

        await self._write(run)
