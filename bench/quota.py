"""The mailbox quota check, before and after the stored per-mailbox total.

    .venv/bin/python bench/quota.py [--messages N] [--rounds R] [--json]

Fills one mailbox with N messages (default 10,000) on the SQLCipher and file backends,
then times, R times each: the quota check as it was (a sum over the whole mailbox:
`sum(length(payload))` for SQLCipher, a stat of every queue file for the file backend),
the check as it is (`Storage.mailbox_bytes`, one stored total), and a durable enqueue.
"Enqueue + check" is what one send costs the server; compare it with an empty mailbox.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from qpq_server.secrets import Secret
from qpq_server.storage.base import Storage
from qpq_server.storage.filestore import FileStorage
from qpq_server.storage.sqlcipher import SqlCipherStorage, connect_sqlcipher

KEY = Secret("ab" * 32)
PAYLOAD = b"x" * 200  # an E2E-sized message


async def _median_ms(fn: Callable[[], Awaitable[object]], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _old_sql_check(db: Path) -> Callable[[], Awaitable[object]]:
    conn = connect_sqlcipher(db, KEY)

    async def check() -> object:
        return conn.execute("SELECT sum(length(payload)) FROM messages WHERE recipient = ?",
                            ("bob",)).fetchone()
    return check


def _old_file_check(root: Path) -> Callable[[], Awaitable[object]]:
    queue = root / "queues" / "u-bob"

    async def check() -> object:
        return await asyncio.to_thread(lambda: sum(p.stat().st_size for p in queue.iterdir()))
    return check


async def _fill(storage: Storage, backend: str, path: Path, messages: int) -> None:
    if backend == "sqlcipher":  # one transaction: the triggers keep the total as usual
        conn = connect_sqlcipher(path, KEY)
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO messages(recipient, sender, payload, sent_at)"
                         " VALUES ('bob', 'alice', ?, 0)", [(PAYLOAD,)] * messages)
        conn.execute("COMMIT")
        conn.close()
        return
    for start in range(0, messages, 100):
        await asyncio.gather(*(storage.enqueue("alice", ["bob"], PAYLOAD, 0.0)
                               for _ in range(min(100, messages - start))))


async def measure(backend: str, messages: int, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # a real disk, not tmpfs
        path = Path(tmp) / ("qpq.db" if backend == "sqlcipher" else "store")
        storage: Storage = (SqlCipherStorage(path, KEY) if backend == "sqlcipher"
                            else FileStorage(path))
        await storage.open()
        try:
            await storage.enqueue("alice", ["bob"], PAYLOAD, 0.0)  # tables and dirs exist
            old = _old_sql_check(path) if backend == "sqlcipher" else _old_file_check(path)
            new = lambda: storage.mailbox_bytes(["bob"])  # noqa: E731
            enqueue = lambda: storage.enqueue("alice", ["bob"], PAYLOAD, 0.0)  # noqa: E731
            result = {"empty_old_check_ms": await _median_ms(old, rounds),
                      "empty_new_check_ms": await _median_ms(new, rounds)}
            await _fill(storage, backend, path, messages)
            result |= {"full_old_check_ms": await _median_ms(old, rounds),
                       "full_new_check_ms": await _median_ms(new, rounds),
                       "enqueue_ms": await _median_ms(enqueue, rounds)}
        finally:
            await storage.close()
    result["full_before_ms"] = result["enqueue_ms"] + result["full_old_check_ms"]
    result["full_after_ms"] = result["enqueue_ms"] + result["full_new_check_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    figures = {b: asyncio.run(measure(b, args.messages, args.rounds))
               for b in ("sqlcipher", "file")}
    if args.json:
        print(json.dumps({"messages": args.messages, **figures}))
        return
    print(f"mailbox of {args.messages} messages, median of {args.rounds} (ms)")
    print(f"{'backend':10} {'check before':>13} {'check after':>12} {'enqueue':>8} "
          f"{'enqueue+check before':>21} {'after':>7}")
    for backend, f in figures.items():
        print(f"{backend:10} {f['full_old_check_ms']:13.3f} {f['full_new_check_ms']:12.3f} "
              f"{f['enqueue_ms']:8.3f} {f['full_before_ms']:21.3f} {f['full_after_ms']:7.3f}")


if __name__ == "__main__":
    main()
