"""How qpq scales with worker processes and nodes, side by side in one run (not a test).

    .venv/bin/python bench/scale.py [--seconds 8] [--connections 8] [--wakes 40] [--json]

Scenarios, each on a fresh data dir (and a fresh database of one throw-away PostgreSQL
from Debian's package, `qpq_server.devpostgres`):

    sqlcipher, 1 node, workers = 1 | 2
    postgres,  1 node, workers = 1 | 2
    postgres,  2 nodes (one PostgreSQL), workers = 1 each

Per scenario `--connections` clients (spread over the nodes, each its own account) loop
enqueue + fetch + ack for `--seconds`. Printed: round trips/s (one = those three
requests), qpq server CPU per round trip (every server process: supervisor and workers,
from /proc), PostgreSQL CPU per round trip, p50/p95 latency; for two nodes also the
cross-node wake-up latency (a fetch parked on node B answered after an enqueue through
node A) p50/p95. Client, servers and PostgreSQL share this machine's cores (2 on the
development box), so compare figures within one run: throughput cannot double when the
load generator itself needs a core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import tomli_w

from qpq_server.client import QpqClient, QpqConnection
from qpq_server.devpostgres import PostgresCluster, postgres_cluster
from qpq_server.devserver import BIN, RunningServer, free_port, init_server_dir, start_server
from qpq_server.secrets import read_env_file, write_env_file

TICKS = os.sysconf("SC_CLK_TCK")
OVERRIDES: dict[str, dict[str, object]] = {
    "rate_limit": {"enabled": False},
    "quic": {"max_handshakes_in_flight": 4096, "retry": "never"},
}


@dataclass
class Row:
    scenario: str
    backend: str
    nodes: int
    workers: int
    round_trips_per_s: float
    server_cpu_ms_per_rt: float
    postgres_cpu_ms_per_rt: float | None
    p50_ms: float
    p95_ms: float
    wake_p50_ms: float | None = None
    wake_p95_ms: float | None = None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def tree_cpu_s(roots: list[int]) -> float:
    """utime + stime of these processes and all their live descendants."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / TICKS
    total = 0.0
    for pid, seconds in cpu.items():
        walk = pid
        while walk > 1:
            if walk in roots:
                total += seconds
                break
            walk = parent.get(walk, 0)
    return total


def postmaster_pid(cluster: PostgresCluster) -> int:
    return int((cluster.datadir / "postmaster.pid").read_text().split()[0])


@contextmanager
def nodes(tmp: Path, backend: str, count: int, workers: int,
          cluster: PostgresCluster | None) -> Iterator[list[RunningServer]]:
    overrides = {**OVERRIDES, "server": {"workers": workers},
                 "storage": {"backend": backend}}
    first = init_server_dir(tmp / "n0", overrides)
    if cluster is not None:
        env = read_env_file(first.parent / ".env")
        write_env_file(first.parent / ".env",
                       {**env, "QPQ_DATABASE_URL": cluster.new_database()})
    configs = [first]
    for i in range(1, count):
        data = tmp / f"n{i}"
        subprocess.run([str(BIN / "qpq-server"), "init", "--data-dir", str(data), "--join",
                        str(first.parent)], check=True, capture_output=True, timeout=60)
        path = data / "qpq-server.toml"
        config = tomllib.loads(path.read_text())
        config["server"]["listen"] = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
        config["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
        path.write_text(tomli_w.dumps(config))
        configs.append(path)
    started: list[RunningServer] = []
    try:
        for path in configs:
            started.append(start_server(path, ready_timeout=60))
        yield started
    finally:
        for srv in started:
            srv.stop()


@asynccontextmanager
async def clients(servers: list[RunningServer], n: int, tmp: Path,
                  ) -> AsyncIterator[list[tuple[QpqConnection, str]]]:
    """n connections round robin over the nodes, each logged in as its own account."""
    async with AsyncExitStack() as stack:
        out = []
        for i in range(n):
            srv = servers[i % len(servers)]
            conn = await stack.enter_async_context(srv.connect(timeout=30, idle_timeout=300))
            client = QpqClient(conn, tmp / "profiles")
            user = f"u{i}"
            await client.register(user, "pw")
            out.append((conn, client.profile(user).session))
        yield out


async def load(conns: list[tuple[QpqConnection, str]], seconds: float,
               ) -> tuple[int, list[float], float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    payload = b"x" * 200

    async def loop(conn: QpqConnection, session: str, user: str) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await conn.call("enqueue", session=session, recipients=[user], payload=payload)
            got = await conn.call("fetch", session=session, limit=1)
            if got["messages"]:
                await conn.call("ack", session=session, ids=[got["messages"][0]["id"]])
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(loop(c, s, f"u{i}") for i, (c, s) in enumerate(conns)))
    return len(latencies), latencies, time.perf_counter() - started


async def wake_latencies(servers: list[RunningServer], tmp: Path, samples: int,
                         ) -> list[float]:
    """A fetch parked on node B, an enqueue through node A: time until B answers."""
    a, b = servers[0], servers[1]
    async with a.connect(timeout=30) as ca, b.connect(timeout=30) as cb:
        sender, waiter = QpqClient(ca, tmp / "wa"), QpqClient(cb, tmp / "wb")
        await sender.register("wake_a", "pw")
        await waiter.register("wake_b", "pw")
        s_session, w_session = sender.profile("wake_a").session, waiter.profile("wake_b").session
        out = []
        for _ in range(samples):
            parked = asyncio.ensure_future(cb.call("fetch", session=w_session, wait_s=10.0,
                                                   limit=10, timeout=20))
            deadline = time.monotonic() + 10
            while b.metric("qpq_delivery_waiters") < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            t0 = time.perf_counter()
            await ca.call("enqueue", session=s_session, recipients=["wake_b"], payload=b"w")
            got = await parked
            out.append(time.perf_counter() - t0)
            await cb.call("ack", session=w_session, ids=[m["id"] for m in got["messages"]])
        return out


async def scenario(name: str, backend: str, count: int, workers: int, args: argparse.Namespace,
                   cluster: PostgresCluster | None) -> Row:
    with tempfile.TemporaryDirectory(prefix="qpq-scale-") as raw:
        tmp = Path(raw)
        with nodes(tmp, backend, count, workers, cluster) as servers:
            async with clients(servers, args.connections, tmp) as conns:
                roots = [s.process.pid for s in servers]
                pg_roots = [postmaster_pid(cluster)] if cluster is not None else []
                cpu0, pg0 = tree_cpu_s(roots), tree_cpu_s(pg_roots)
                done, latencies, elapsed = await load(conns, args.seconds)
                cpu1, pg1 = tree_cpu_s(roots), tree_cpu_s(pg_roots)
            wakes = await wake_latencies(servers, tmp, args.wakes) if count > 1 else []
    return Row(
        scenario=name, backend=backend, nodes=count, workers=workers,
        round_trips_per_s=done / elapsed,
        server_cpu_ms_per_rt=(cpu1 - cpu0) * 1000 / max(done, 1),
        postgres_cpu_ms_per_rt=(pg1 - pg0) * 1000 / max(done, 1) if cluster else None,
        p50_ms=percentile(latencies, 0.5) * 1000, p95_ms=percentile(latencies, 0.95) * 1000,
        wake_p50_ms=percentile(wakes, 0.5) * 1000 if wakes else None,
        wake_p95_ms=percentile(wakes, 0.95) * 1000 if wakes else None)


def table(rows: list[Row]) -> str:
    def f(v: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if v is None else fmt.format(v)

    lines = ["| scenario | round trips/s | vs 1 worker | qpq CPU ms/rt | PostgreSQL CPU "
             "ms/rt | p50 / p95 ms | cross-node wake p50 / p95 ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    base = {r.backend: r.round_trips_per_s for r in rows if r.nodes == 1 and r.workers == 1}
    for r in rows:
        ratio = r.round_trips_per_s / base[r.backend] if r.backend in base else None
        lines.append(
            f"| {r.scenario} | {r.round_trips_per_s:.0f} | {f(ratio, '{:.2f}x')} | "
            f"{r.server_cpu_ms_per_rt:.2f} | {f(r.postgres_cpu_ms_per_rt, '{:.2f}')} | "
            f"{r.p50_ms:.1f} / {r.p95_ms:.1f} | "
            f"{f(r.wake_p50_ms)} / {f(r.wake_p95_ms)} |")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--wakes", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2,
                        help="the N of the workers = N scenarios (default 2)")
    parser.add_argument("--json", action="store_true", help="print JSON alone")
    args = parser.parse_args()
    if args.seconds <= 0 or args.connections < 1 or args.wakes < 1 or args.workers < 2:
        parser.error("--seconds > 0, --connections >= 1, --wakes >= 1, --workers >= 2")
    rows: list[Row] = []
    n = args.workers
    rows.append(await scenario("sqlcipher, 1 node, workers=1", "sqlcipher", 1, 1, args, None))
    rows.append(await scenario(f"sqlcipher, 1 node, workers={n}", "sqlcipher", 1, n, args,
                               None))
    with postgres_cluster() as cluster:
        for name, count, workers in (("postgres, 1 node, workers=1", 1, 1),
                                     (f"postgres, 1 node, workers={n}", 1, n),
                                     ("postgres, 2 nodes, workers=1 each", 2, 1)):
            rows.append(await scenario(name, "postgres", count, workers, args, cluster))
    if args.json:
        print(json.dumps({"cores": os.cpu_count(), "connections": args.connections,
                          "seconds": args.seconds, "rows": [asdict(r) for r in rows]},
                         indent=2))
        return
    print(f"{os.cpu_count()} cores (client, servers and PostgreSQL share them); "
          f"{args.connections} connections, {args.seconds:g} s per scenario\n")
    print(table(rows))


if __name__ == "__main__":
    asyncio.run(main())
