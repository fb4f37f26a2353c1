"""What `recv` has delivered, per server and user: a seen-set of message ids and the
records of messages that could not be delivered.

A message is acked on the server only after it was shown (stdout flushed) or saved, so
a crash in between, or a second `recv` running at the same time, gets it again: the
seen-set makes it shown once. Delivery runs under an exclusive lock on the log, so of two
processes holding the same message only one shows it.

Layout: PROFILE_DIR/inbox/<server>/USER.delivered, where <server> is the address and
the start of the server's key-transparency key (a re-initialised server numbers its
messages from 1 again: its ids must not match the old server's) (one message id per line, appended
and fsynced after the message was shown), USER.failures.jsonl (one JSON object per
message that was reported and acked without its content: a poisoned attachment), and
USER.lock.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qpq_server.client.profile import locked, server_file_name
from qpq_server.fsutil import write_atomic

__all__ = ["DeliveryLog"]

KEEP_IDS = 10_000  # newest ids kept when the log is compacted: far more than one fetch


class DeliveryLog:
    def __init__(self, profile_dir: Path, server: str, username: str) -> None:
        directory = profile_dir / "inbox" / server_file_name(server)
        self.path = directory / f"{username}.delivered"
        self.failures_path = directory / f"{username}.failures.jsonl"
        self._lock = directory / f"{username}.lock"
        self._ids: set[int] = set()

    @contextmanager
    def delivering(self) -> Iterator[DeliveryLog]:
        """Hold the lock with the ids on disk loaded: check `seen`, show the message,
        then `add` it, all inside one block."""
        with locked(self._lock):
            self._ids = self._load()
            yield self

    def seen(self, message_id: int) -> bool:
        return message_id in self._ids

    def add(self, message_id: int) -> None:
        """Record a message as shown (durably: a crash after this shows it no more)."""
        self._append(self.path, f"{message_id}\n")
        self._ids.add(message_id)
        if len(self._ids) > 2 * KEEP_IDS:
            keep = sorted(self._ids)[-KEEP_IDS:]
            write_atomic(self.path, "".join(f"{i}\n" for i in keep), mode=0o600)
            self._ids = set(keep)

    def record_failure(self, message_id: int, sender: str, sent_at: float, code: str,
                       detail: str) -> None:
        """Keep a record of a message acked without its content."""
        entry = {"id": message_id, "from": sender, "sent_at": sent_at, "error": code,
                 "detail": detail, "recorded_at": time.time()}
        self._append(self.failures_path, json.dumps(entry) + "\n")

    def failures(self) -> list[dict[str, object]]:
        try:
            lines = self.failures_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def _load(self) -> set[int]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return set()
        # A crash mid-append leaves at most a partial last line: skip it.
        return {int(line) for line in text.split("\n")[:-1] if line.isdigit()}

    @staticmethod
    def _append(path: Path, line: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
