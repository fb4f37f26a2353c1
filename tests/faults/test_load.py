"""200 clients sending against one real server for a bounded time.

Bars (those a mature messaging server sets for its load tests): errors < 0.025 % and
p99 send→ack < 2 s. The figures are printed. `make test` runs a short burst (each
client sends a few messages); `make soak` (QPQ_SOAK=1) sends for 60 s.

The clients share 10 sender accounts (an OPAQUE registration per client would measure
login, not messaging); each has its own QUIC connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

from qpq_server.client import connect
from tests.helpers.rawclient import session
from tests.helpers.server import running_server

SOAK = os.environ.get("QPQ_SOAK") == "1"
CLIENTS = 200
ACCOUNTS = 10
DURATION_S = 60.0 if SOAK else 0.0  # 0: each client sends MESSAGES_SHORT and stops
MESSAGES_SHORT = 3
# Clients come from 20 loopback addresses (the server caps unauthenticated connections
# per address, as it should against one abusive host) and connect 20 at a time, as a
# real population ramps up; the bars are about sending, not a handshake storm.
SOURCES = 20
RAMP = 20


async def test_200_clients_error_rate_and_p99(tmp_path: Path) -> None:
    overrides = {"rate_limit": {"enabled": False}}
    with running_server(tmp_path, overrides=overrides) as srv:
        ramp = asyncio.Semaphore(RAMP)

        async def client(index: int, sender: str, recipient: str, latencies: list[float],
                         errors: list[str], start: asyncio.Event) -> None:
            try:
                async with contextlib.AsyncExitStack() as stack:
                    async with ramp:
                        conn = await stack.enter_async_context(connect(
                            srv.address, srv.auth_token, ca=srv.ca_cert,
                            server_name="localhost", timeout=30,
                            local_host=f"127.0.0.{2 + index % SOURCES}"))
                    await start.wait()
                    deadline = time.monotonic() + DURATION_S
                    sent = 0
                    while (sent < MESSAGES_SHORT if not DURATION_S
                           else time.monotonic() < deadline):
                        t0 = time.perf_counter()
                        try:
                            await conn.call("enqueue", session=sender, recipients=[recipient],
                                            payload=os.urandom(200), timeout=10)
                            latencies.append(time.perf_counter() - t0)
                        except Exception as exc:
                            errors.append(type(exc).__name__ + ": " + str(exc)[:80])
                        sent += 1
            except Exception as exc:  # could not connect at all: one error per client
                errors.append(f"connect: {exc}")

        async with connect(srv.address, srv.auth_token, ca=srv.ca_cert,
                           server_name="localhost", timeout=30) as setup:
            senders = [await session(setup, f"load{i}") for i in range(ACCOUNTS)]
            for i in range(ACCOUNTS):
                await session(setup, f"sink{i}")
        latencies: list[float] = []
        errors: list[str] = []
        start = asyncio.Event()
        tasks = [asyncio.create_task(client(i, senders[i % ACCOUNTS], f"sink{i % ACCOUNTS}",
                                            latencies, errors, start))
                 for i in range(CLIENTS)]
        await asyncio.sleep(0)
        # Let the handshakes finish (bounded), then release every client at once.
        deadline = time.monotonic() + 60
        while (time.monotonic() < deadline
               and srv.metric("qpq_connections_active") < CLIENTS - len(errors)):
            await asyncio.sleep(0.2)
        began = time.perf_counter()
        start.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=DURATION_S + 120)
        elapsed = time.perf_counter() - began
        queued = srv.metric("qpq_enqueue_total")

    total = len(latencies) + len(errors)
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    error_rate = len(errors) / total
    print(f"\nload: {CLIENTS} clients, {total} sends in {elapsed:.1f}s "
          f"({len(latencies) / elapsed:.0f}/s), errors {len(errors)} ({error_rate:.4%}), "
          f"send->ack p50 {p50 * 1000:.0f} ms p99 {p99 * 1000:.0f} ms")
    assert error_rate < 0.00025, errors[:5]
    assert p99 < 2.0
    assert queued == len(latencies)
