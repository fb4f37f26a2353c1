"""Content-addressed blob storage under DATA_DIR/blobs/.

Layout (documented for backups in docs/storage-backends.md)::

    blobs/ab/cd/abcd...64hex          the ciphertext; name = SHA-256 of its bytes
    blobs/ab/cd/abcd...64hex.meta     JSON: owner, size, created_at, pending recipients
    blobs/tmp/*.part                  uploads in progress (emptied at every start)

An upload is written to `tmp/`, checked (size and hash), fsynced, and only then renamed
into place with its directory fsynced, so a crash or a cut-off upload never leaves a
partial blob visible. The `.meta` file is written first: a blob file always has one
(a `.meta` without its blob is removed at start).

Chunks are written with plain `os.write` on the event loop: each is at most one frame
(<= max_frame_bytes) and lands in the page cache, and writing it at once is what keeps
server memory bounded (aioquic grants flow-control credit as data arrives, so queuing
writes would let a fast uploader fill memory). The fsync and the rename run on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography.hazmat.primitives import hashes

from qpq_server.errors import BadRequest, HashMismatch, NotFound, QuotaExceeded, TooLarge
from qpq_server.fsutil import fsync_dir, write_atomic

__all__ = ["BlobInfo", "BlobStore", "HashMismatch", "QuotaExceeded", "Upload"]

_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class BlobInfo:
    blob_id: str  # 64 hex digits: SHA-256 of the ciphertext
    owner: str
    size: int
    created_at: float
    pending: frozenset[str] = field(default_factory=frozenset)


class Upload:
    """One upload in progress: a temp file, a running hash, a byte count."""

    def __init__(self, store: BlobStore, owner: str, blob_id: str, size: int, path: Path,
                 fd: int) -> None:
        self.store = store
        self.owner = owner
        self.blob_id = blob_id
        self.size = size
        self.path = path
        self.written = 0
        self._fd: int | None = fd
        self._hash = hashes.Hash(hashes.SHA256())
        self.done = False

    def write(self, chunk: bytes) -> None:
        if self.written + len(chunk) > self.size:
            raise TooLarge(f"upload is larger than the declared {self.size} bytes")
        assert self._fd is not None
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view):]
        self._hash.update(chunk)
        self.written += len(chunk)

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def commit(self, now: float) -> BlobInfo:
        """Verify size and hash, make the blob durable and visible; abort on failure."""
        try:
            if self.written != self.size:
                raise BadRequest(f"upload ended after {self.written} of {self.size} bytes")
            if self._hash.finalize().hex() != self.blob_id:
                raise HashMismatch("uploaded bytes do not match the declared sha256")
            assert self._fd is not None
            fd = self._fd
            await asyncio.to_thread(os.fsync, fd)
            self._close_fd()
            info = await asyncio.to_thread(self.store._store, self.path,
                                           BlobInfo(self.blob_id, self.owner, self.size, now))
        except BaseException:
            self.abort()
            raise
        self.done = True
        self.store._finish_upload(self, info)
        return info

    def abort(self) -> None:
        """Drop the partial upload: nothing of it stays on disk or in the quota."""
        if self.done:
            return
        self.done = True
        self._close_fd()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.store._finish_upload(self, None)


class BlobStore:
    def __init__(self, root: Path, *, max_blob_bytes: int, quota_bytes_per_account: int,
                 retention_s: float, on_bytes: Callable[[int], None] | None = None,
                 max_concurrent_uploads: int = 4,
                 on_refused: Callable[[str], None] | None = None,
                 worker: int | None = None) -> None:
        # Several worker processes share the directory: each keeps its own temp dir,
        # and reads a blob's .meta from disk before trusting its in-memory copy.
        self._worker = worker
        self.max_concurrent_uploads = max_concurrent_uploads
        self._on_refused = on_refused
        self._uploads_of: dict[str, int] = {}  # owner -> uploads in progress
        self.root = root
        self.max_blob_bytes = max_blob_bytes
        self.quota = quota_bytes_per_account
        self.retention_s = retention_s
        self._on_bytes = on_bytes
        self._blobs: dict[str, BlobInfo] = {}
        self._reserved: dict[str, int] = {}  # owner -> bytes of uploads in progress
        self._uploading: set[str] = set()
        # Every .meta change is a read-modify-write: one writer at a time, in this
        # process (threads) and, in shared mode, across workers (a lock file).
        self._meta_mutex = threading.Lock()

    @property
    def _shared(self) -> bool:
        return self._worker is not None

    @property
    def tmp_dir(self) -> Path:
        base = self.root / "tmp"
        return base / f"w{self._worker}" if self._worker is not None else base

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self._blobs.values())

    def path_for(self, blob_id: str) -> Path:
        return self.root / blob_id[:2] / blob_id[2:4] / blob_id

    def _meta_path(self, blob_id: str) -> Path:
        return self.root / blob_id[:2] / blob_id[2:4] / f"{blob_id}.meta"

    def _report(self) -> None:
        if self._on_bytes is not None:
            self._on_bytes(self.total_bytes)

    # -- startup -----------------------------------------------------------------------
    async def open(self) -> None:
        await asyncio.to_thread(self._load)
        self._report()

    def _load(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.tmp_dir.exists():  # uploads cut off by a crash or a stop (ours only)
            for leftover in self.tmp_dir.iterdir():
                if leftover.is_dir():
                    if not self._shared:  # per-worker dirs of an earlier multi-worker run
                        shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink()
        self.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for meta in self.root.glob("??/??/*.meta"):
            blob_id = meta.name[:-5]
            blob = meta.with_name(blob_id)
            if not _HEX64.match(blob_id) or not blob.exists():
                # The install did not finish: the upload was never acknowledged. With
                # sibling workers it may be one installing right now: only old ones go.
                if not self._shared or meta.stat().st_mtime < time.time() - 3600:
                    meta.unlink()
                continue
            data = json.loads(meta.read_text())
            self._blobs[blob_id] = BlobInfo(blob_id, str(data["owner"]), int(data["size"]),
                                            float(data["created_at"]),
                                            frozenset(data.get("pending", [])))
        for blob in self.root.glob("??/??/*"):
            if _HEX64.match(blob.name) and blob.name not in self._blobs:
                blob.unlink()  # a blob without its .meta was never acknowledged

    # -- queries -----------------------------------------------------------------------
    def get(self, blob_id: str) -> BlobInfo | None:
        if self._shared:
            self._reload(blob_id)
        return self._blobs.get(blob_id)

    def _reload(self, blob_id: str) -> None:
        """Shared mode: another worker may have stored, referenced or deleted it."""
        if not _HEX64.match(blob_id):
            return
        try:
            data = json.loads(self._meta_path(blob_id).read_text())
            present = self.path_for(blob_id).exists()
        except (OSError, ValueError):
            present = False
        if not present:
            self._blobs.pop(blob_id, None)
            return
        self._blobs[blob_id] = BlobInfo(blob_id, str(data["owner"]), int(data["size"]),
                                        float(data["created_at"]),
                                        frozenset(data.get("pending", [])))

    def visible_to(self, blob_id: str, user: str) -> BlobInfo | None:
        """The blob if `user` uploaded it or a queued message to `user` names it; else
        None, exactly as for a blob that does not exist (no one learns of others').
        `user` may be USER/DEVICE: a message names the blob for each device it went to."""
        info = self.get(blob_id)
        if info is None or (user.split("/", 1)[0] != info.owner
                            and not _refs_of(info.pending, user)):
            return None
        return info

    def usage(self, owner: str) -> int:
        held = sum(b.size for b in self._blobs.values() if b.owner == owner)
        return held + self._reserved.get(owner, 0)

    # -- uploads -----------------------------------------------------------------------
    def begin_upload(self, owner: str, blob_id: str, size: int) -> Upload:
        """Check limits and reserve quota; raise a RequestError to refuse."""
        if size > self.max_blob_bytes:
            raise TooLarge(f"blob of {size} bytes exceeds max_blob_bytes={self.max_blob_bytes}")
        if self.usage(owner) + size > self.quota:
            raise QuotaExceeded(f"upload would exceed the account quota of {self.quota} bytes "
                                f"({self.usage(owner)} in use)")
        if blob_id in self._uploading:
            raise BadRequest("this blob is being uploaded already; retry later")
        if self._uploads_of.get(owner, 0) >= self.max_concurrent_uploads:
            if self._on_refused is not None:
                self._on_refused("uploads")
            raise QuotaExceeded(f"at most {self.max_concurrent_uploads} uploads at once per "
                                "account; wait for one to finish")
        path = self.tmp_dir / f"{blob_id[:16]}-{secrets.token_hex(8)}.part"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._reserved[owner] = self._reserved.get(owner, 0) + size
        self._uploads_of[owner] = self._uploads_of.get(owner, 0) + 1
        self._uploading.add(blob_id)
        return Upload(self, owner, blob_id, size, path, fd)

    def _finish_upload(self, upload: Upload, info: BlobInfo | None) -> None:
        self._reserved[upload.owner] -= upload.size
        if not self._reserved[upload.owner]:
            del self._reserved[upload.owner]
        self._uploads_of[upload.owner] -= 1
        if not self._uploads_of[upload.owner]:
            del self._uploads_of[upload.owner]
        self._uploading.discard(upload.blob_id)
        if info is not None:
            self._blobs[info.blob_id] = info
            self._report()

    @contextlib.contextmanager
    def _meta_lock(self) -> Iterator[None]:
        with self._meta_mutex:
            if not self._shared:
                yield
                return
            fd = os.open(self.root / ".meta.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the lock

    def _current(self, blob_id: str) -> BlobInfo | None:
        """Under the lock: the blob as stored now (another worker may have changed it)."""
        if self._shared:
            self._reload(blob_id)
        return self._blobs.get(blob_id)

    def _store(self, tmp: Path, new: BlobInfo) -> BlobInfo:
        """Thread: install a verified upload, or, when the same bytes are stored already,
        record its uploader as a holder and drop the copy."""
        with self._meta_lock():
            held = self._current(new.blob_id)
            if held is not None:
                info = replace(held, pending=held.pending | {new.owner})
                self._write_meta(info)
                tmp.unlink()
                return info
            final = self.path_for(new.blob_id)
            final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fsync_dir(final.parent.parent)
            fsync_dir(final.parent.parent.parent)
            self._write_meta(new)  # meta first, then the blob itself, each made durable
            os.replace(tmp, final)
            fsync_dir(final.parent)
            fsync_dir(self.tmp_dir)
            return new

    def _change_meta(self, blob_id: str,
                     change: Callable[[BlobInfo], BlobInfo]) -> BlobInfo | None:
        """Thread: apply `change` to the stored .meta; None when the blob is gone."""
        with self._meta_lock():
            info = self._current(blob_id)
            if info is None:
                return None
            updated = change(info)
            if updated != info:
                self._write_meta(updated)
                self._blobs[blob_id] = updated
            return updated

    def _delete_if_unreferenced(self, blob_id: str) -> bool:
        """Thread: delete an expired blob unless a recipient was added meanwhile."""
        with self._meta_lock():
            info = self._current(blob_id)
            if info is not None and info.pending:
                return False
            self._blobs.pop(blob_id, None)
            self._delete(blob_id)
            return True

    def _write_meta(self, info: BlobInfo) -> None:
        write_atomic(self._meta_path(info.blob_id), json.dumps({
            "owner": info.owner, "size": info.size, "created_at": info.created_at,
            "pending": sorted(info.pending)}).encode())

    # -- references and expiry ---------------------------------------------------------
    async def add_refs(self, blob_ids: Iterable[str], recipients: Iterable[str]) -> None:
        """A queued message names these blobs: keep them until each recipient fetched."""
        names = frozenset(recipients)
        for blob_id in blob_ids:
            updated = await asyncio.to_thread(
                self._change_meta, blob_id, lambda i: replace(i, pending=i.pending | names))
            if updated is None:
                raise NotFound(f"no blob {blob_id}")

    async def downloaded(self, blob_id: str, user: str) -> None:
        if not _HEX64.match(blob_id):
            return
        await asyncio.to_thread(self._change_meta, blob_id,
                                lambda i: replace(i, pending=i.pending - _refs_of(i.pending,
                                                                                  user)))

    async def sweep(self, now: float | None = None) -> list[str]:
        """Delete blobs older than the retention that no pending recipient still needs."""
        now = time.time() if now is None else now
        candidates = [b.blob_id for b in self._blobs.values()
                      if not b.pending and b.created_at < now - self.retention_s]
        expired = [blob_id for blob_id in candidates
                   if await asyncio.to_thread(self._delete_if_unreferenced, blob_id)]
        if expired:
            self._report()
        return expired

    def _delete(self, blob_id: str) -> None:
        for path in (self.path_for(blob_id), self._meta_path(blob_id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        fsync_dir(self.path_for(blob_id).parent)


def _refs_of(pending: frozenset[str], who: str) -> frozenset[str]:
    """The references `who` holds: its own (USER or USER/DEVICE), and for a client from
    before devices (plain USER) every device's of that user."""
    return frozenset(p for p in pending
                     if p == who or ("/" not in who and p.split("/", 1)[0] == who))
