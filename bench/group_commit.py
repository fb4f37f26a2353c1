"""Durable enqueues per second: grouped commits against one commit per message.

    .venv/bin/python bench/group_commit.py [--seconds S] [--concurrency N] [--json]

Drives `SqlCipherStorage.enqueue` directly (real file, WAL, synchronous=FULL: each
commit is an fsync) from N concurrent tasks, twice in one run: with the writer's
grouped commits (`max_batch`, the server's default 64) and with `max_batch=1`, one
commit per message. Every enqueue returns only after its commit, in both. The target
(issue 17) is grouped >= 4 x one-commit-per-message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from qpq_server.secrets import Secret
from qpq_server.storage.sqlcipher import SqlCipherStorage

PAYLOAD = b"x" * 200  # an E2E-sized message


async def run(max_batch: int, concurrency: int, seconds: float) -> dict[str, float]:
    commits: list[float] = []
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # a real disk, not tmpfs
        storage = SqlCipherStorage(Path(tmp) / "qpq.db", Secret("ab" * 32),
                                   max_batch=max_batch, on_commit=commits.append)
        await storage.open()
        try:
            for name in ("s", "r"):
                await storage.create_account(name, b"pf", 1, 0.0)
            commits.clear()
            done = 0
            deadline = time.perf_counter() + seconds

            async def sender() -> None:
                nonlocal done
                while time.perf_counter() < deadline:
                    await storage.enqueue("s", ["r"], PAYLOAD, time.time())
                    done += 1

            began = time.perf_counter()
            await asyncio.gather(*(sender() for _ in range(concurrency)))
            elapsed = time.perf_counter() - began
        finally:
            await storage.close()
    return {"enqueues_per_s": done / elapsed, "commits_per_s": len(commits) / elapsed,
            "messages_per_commit": done / max(len(commits), 1)}


async def measure(concurrency: int, seconds: float) -> dict[str, Any]:
    single = await run(1, concurrency, seconds)
    grouped = await run(64, concurrency, seconds)
    serial = await run(64, 1, seconds)
    return {"concurrency": concurrency, "seconds": seconds,
            "one_commit_per_message": single, "grouped": grouped, "one_sender": serial,
            "group_commit_ratio": grouped["enqueues_per_s"] / single["enqueues_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per step")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent senders")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.seconds <= 0 or args.concurrency < 1:
        parser.error("--seconds must be > 0 and --concurrency >= 1")
    r = asyncio.run(measure(args.concurrency, args.seconds))
    if args.json:
        print(json.dumps(r, indent=2))
        return
    for key, label in (("one_commit_per_message", "one commit per message"),
                       ("grouped", "grouped commits"), ("one_sender", "one sender, grouped")):
        f = r[key]
        print(f"{label:<26}{f['enqueues_per_s']:>10.0f} enqueues/s{f['commits_per_s']:>10.0f} "
              f"commits/s{f['messages_per_commit']:>8.1f} msgs/commit")
    print(f"group_commit_ratio {r['group_commit_ratio']:.1f} (target >= 4) "
          f"at {r['concurrency']} concurrent senders")


if __name__ == "__main__":
    main()
