"""The end-to-end-encryption step of a restore: purge one-time key packages.

A restored database holds one-time key packages that may already have been handed out
after the snapshot; handing one out again would make two senders encrypt to the same
one-time key and break the recipient's sessions. So the restore deletes them all
(clients notice they have none on the server and upload fresh ones; identity keys stay).

Sequence, each step its own commit:
1. `restore_state = pending_purge` in the *staged* copy, before it is moved into place.
   From here on the server refuses to start on this database.
2. the staged files are moved into the data dir.
3. one transaction: `DELETE FROM key_packages`, `restore_state = done`.
A crash between 1 and 3 leaves `pending_purge`: the server refuses to start until
`qpq-ops restore --resume` runs step 3.
"""

from __future__ import annotations

import time
from typing import Any

from qpq_server.storage.base import RESTORE_STATE_KEY

__all__ = ["PENDING_PURGE", "complete_purge", "mark_pending_purge", "restore_state"]

Connection = Any
PENDING_PURGE = "pending_purge"
DONE = "done"
_UPSERT = ("INSERT INTO meta(key, value) VALUES (?, ?)"
           " ON CONFLICT(key) DO UPDATE SET value = excluded.value")


def restore_state(conn: Connection) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (RESTORE_STATE_KEY,)).fetchone()
    return str(row[0]) if row else None


def mark_pending_purge(conn: Connection, archive_name: str) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(_UPSERT, (RESTORE_STATE_KEY, PENDING_PURGE))
    conn.execute(_UPSERT, ("restored_from", archive_name))
    conn.execute("COMMIT")


def complete_purge(conn: Connection) -> int:
    """Delete every one-time key package and record the purge as done, atomically."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        cur = conn.execute("DELETE FROM key_packages")
        purged = int(cur.rowcount)
        conn.execute(_UPSERT, (RESTORE_STATE_KEY, DONE))
        conn.execute(_UPSERT, ("restored_at", f"{time.time():.3f}"))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return purged
