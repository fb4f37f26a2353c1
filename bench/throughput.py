"""Throughput and footprint of a real qpq server on loopback (prints figures; not a test).

    .venv/bin/python bench/throughput.py [--connections 1,10,100] [--seconds 5] [--idle 1000]

For each concurrency N: N client connections each loop enqueue + fetch + ack round trips
for `--seconds`; prints handshakes/s, round trips/s and p50/p95 latency. Then opens
`--idle` idle connections and prints server RSS per idle connection.
Client and server share this machine's cores, so compare figures within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

from qpq_server.client import QpqClient, QpqConnection
from qpq_server.devserver import RunningServer, rss_kb, running_server


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def open_connections(srv: RunningServer, n: int, stack: AsyncExitStack,
                           ) -> tuple[list[QpqConnection], float]:
    started = time.perf_counter()
    sem = asyncio.Semaphore(16)

    async def one() -> QpqConnection:
        async with sem:
            return await stack.enter_async_context(srv.connect(timeout=30, idle_timeout=300))

    conns = await asyncio.gather(*(one() for _ in range(n)))
    return list(conns), time.perf_counter() - started


async def round_trips(srv: RunningServer, n: int, seconds: float, profiles: Path) -> None:
    async with AsyncExitStack() as stack:
        conns, elapsed = await open_connections(srv, n, stack)
        setup = QpqClient(conns[0], profiles)
        user = f"bench{n}"
        await setup.register(user, "pw")
        session = setup.profile(user).session
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker(conn: QpqConnection) -> None:
            payload = b"x" * 200
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                await conn.call("enqueue", session=session, recipients=[user], payload=payload)
                got = await conn.call("fetch", session=session, limit=1)
                if got["messages"]:
                    await conn.call("ack", session=session, ids=[got["messages"][0]["id"]])
                latencies.append(time.perf_counter() - t0)

        t_start = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        total = time.perf_counter() - t_start
        print(f"{n:>5} conns | handshakes {n / elapsed:7.1f}/s | "
              f"enqueue+fetch+ack {len(latencies) / total:7.1f}/s | "
              f"p50 {statistics.median(latencies) * 1000:6.1f} ms | "
              f"p95 {percentile(latencies, 0.95) * 1000:6.1f} ms")


async def idle_footprint(srv: RunningServer, n: int) -> None:
    before = rss_kb(srv.process.pid)
    async with AsyncExitStack() as stack:
        conns, elapsed = await open_connections(srv, n, stack)
        await asyncio.sleep(1.0)
        after = rss_kb(srv.process.pid)
        print(f"{len(conns)} idle connections opened in {elapsed:.1f} s; server RSS "
              f"{before / 1024:.1f} -> {after / 1024:.1f} MB = "
              f"{(after - before) / len(conns):.1f} KB per idle connection")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", default="1,10,100")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--idle", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        overrides: dict[str, dict[str, object]] = {
            "rate_limit": {"enabled": False},
            "quic": {"max_handshakes_in_flight": 4096, "retry": "never"},
        }
        with running_server(Path(tmp), overrides=overrides) as srv:
            print(f"qpq-server pid {srv.process.pid} on {srv.address}, "
                  f"start RSS {rss_kb(srv.process.pid) / 1024:.1f} MB")
            for n in (int(x) for x in args.connections.split(",")):
                await round_trips(srv, n, args.seconds, Path(tmp) / "profiles")
            if args.idle:
                await idle_footprint(srv, args.idle)


if __name__ == "__main__":
    asyncio.run(main())
