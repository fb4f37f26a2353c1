"""A legitimate client's latency under each abuse, against a real server on loopback.

    .venv/bin/python bench/abuse.py [--seconds 6] [--json]

A legitimate client loops enqueue + fetch + ack (one round trip per loop) the whole
time; each phase runs one abuse beside it, from another address (127.0.0.2) where the
abuse would be a separate host. Printed per phase: the legitimate client's p50/p95, its
p95 against the quiet phase, and the server's RSS growth. Goals (issue 11): p95 under any
single abuse <= 2x quiet; RSS growth under any pre-auth abuse <= 64 MiB. Client, abuser
and server share this machine's cores, so compare figures within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from qpq_server.client import ClientError, QpqClient, QpqConnection
from qpq_server.devserver import RunningServer, rss_kb, running_server

ABUSER = "127.0.0.2"


@dataclass
class Phase:
    name: str
    pre_auth: bool
    run: Callable[[RunningServer, float, Path], Awaitable[None]]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def legit_loop(conn: QpqConnection, session: str, user: str, until: float,
                     latencies: list[float]) -> None:
    while time.monotonic() < until:
        t0 = time.perf_counter()
        try:
            await conn.call("enqueue", session=session, recipients=[user], payload=b"x" * 200)
            got = await conn.call("fetch", session=session, limit=10)
            if got["messages"]:
                await conn.call("ack", session=session, ids=[m["id"] for m in got["messages"]])
        except ClientError:
            latencies.append(10.0)  # a failed round trip counts as very slow
            continue
        latencies.append(time.perf_counter() - t0)


# -- the abuses ------------------------------------------------------------------------

async def quiet(srv: RunningServer, until: float, tmp: Path) -> None:
    await asyncio.sleep(max(0.0, until - time.monotonic()))


async def tokenless_buffering(srv: RunningServer, until: float, tmp: Path) -> None:
    """Connections that never say hello and push partial 1 MiB frames."""
    async def one() -> None:
        with contextlib.suppress(ClientError, OSError, TimeoutError):
            async with srv.connect(hello=False, local_host=ABUSER, timeout=5) as conn:
                while time.monotonic() < until and conn.protocol.terminated is None:
                    pending = conn.protocol.send_raw(
                        struct.pack(">I", 1_000_000) + b"x" * 8000, end_stream=False)
                    # The server closes us for this: the answer never comes, by design.
                    pending.add_done_callback(lambda f: f.cancelled() or f.exception())
                    await asyncio.sleep(0.01)

    while time.monotonic() < until:
        await asyncio.gather(*(one() for _ in range(20)))


async def handshake_flood(srv: RunningServer, until: float, tmp: Path) -> None:
    """New connections as fast as one process can open them, none saying hello."""
    sem = asyncio.Semaphore(32)

    async def one() -> None:
        async with sem:
            with contextlib.suppress(ClientError, OSError, TimeoutError):
                async with srv.connect(hello=False, local_host=ABUSER, timeout=5):
                    pass

    tasks: set[asyncio.Task[None]] = set()
    while time.monotonic() < until:
        task = asyncio.ensure_future(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        await asyncio.sleep(0.005)
    await asyncio.gather(*tasks)


async def malformed_requests(srv: RunningServer, until: float, tmp: Path) -> None:
    """An authenticated connection sending requests whose op is a list."""
    async with srv.connect(local_host=ABUSER) as conn:
        while time.monotonic() < until:
            await asyncio.gather(*(conn.call_raw({"op": []}) for _ in range(20)))


async def fan_out_writer(srv: RunningServer, until: float, tmp: Path) -> None:
    """Another account enqueuing 50 KB to 20 recipients as fast as it is let."""
    async with srv.connect(local_host=ABUSER, timeout=30) as conn:
        client = QpqClient(conn, tmp / "fanout")
        names = [f"fan{i}" for i in range(21)]
        for name in names:
            await client.register(name, "pw")
        session = client.profile(names[0]).session
        while time.monotonic() < until:
            with contextlib.suppress(ClientError):
                await conn.call_raw({"op": "enqueue", "session": session,
                                     "recipients": names[1:], "payload": b"f" * 50_000})


async def login_guessing(srv: RunningServer, until: float, tmp: Path) -> None:
    """Wrong-password logins against the legitimate user's account."""
    async with srv.connect(local_host=ABUSER, timeout=30) as conn:
        client = QpqClient(conn, tmp / "guess")
        i = 0
        while time.monotonic() < until:
            with contextlib.suppress(ClientError):
                await client.login("legit", f"guess {i}")
            i += 1


PHASES = [
    Phase("quiet", False, quiet),
    Phase("tokenless partial frames", True, tokenless_buffering),
    Phase("handshake flood", True, handshake_flood),
    Phase("malformed requests", False, malformed_requests),
    Phase("fan-out writer", False, fan_out_writer),
    Phase("login guessing", False, login_guessing),
]


async def run(seconds: float) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        with running_server(tmp / "srv") as srv:
            async with AsyncExitStack() as stack:
                conn = await stack.enter_async_context(srv.connect(timeout=30))
                client = QpqClient(conn, tmp / "legit")
                await client.register("legit", "pw")
                session = client.profile("legit").session
                assert session
                quiet_p95 = 0.0
                for phase in PHASES:
                    rss_before = rss_kb(srv.process.pid)
                    latencies: list[float] = []
                    until = time.monotonic() + seconds
                    await asyncio.gather(legit_loop(conn, session, "legit", until, latencies),
                                         phase.run(srv, until, tmp))
                    p95 = percentile(latencies, 0.95)
                    quiet_p95 = quiet_p95 or p95
                    rows.append({
                        "abuse": phase.name, "pre_auth": phase.pre_auth,
                        "round_trips": len(latencies),
                        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
                        "p95_ms": round(p95 * 1000, 1),
                        "p95_vs_quiet": round(p95 / quiet_p95, 2),
                        "rss_growth_mib": round((rss_kb(srv.process.pid) - rss_before) / 1024, 1),
                    })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = asyncio.run(run(args.seconds))
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'abuse':<26} {'trips':>6} {'p50 ms':>8} {'p95 ms':>8} {'p95/quiet':>10} "
          f"{'RSS +MiB':>9}")
    for r in rows:
        print(f"{r['abuse']:<26} {r['round_trips']:>6} {r['p50_ms']:>8} {r['p95_ms']:>8} "
              f"{r['p95_vs_quiet']:>10} {r['rss_growth_mib']:>9}")


if __name__ == "__main__":
    main()
