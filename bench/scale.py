"""How qpq scales with worker processes and nodes, side by side in one run (not a test).

    .venv/bin/python bench/scale.py [--seconds 8] [--connections 8] [--wakes 40] [--json]
                                    [--repeat N] [--only SUBSTRING] [--profile]

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

`--repeat N` runs every scenario N times, round robin (so a burst of load from other
work hits every scenario alike), and prints the medians and each round's figures.
`--profile` samples every server process (supervisor and workers) with py-spy during the
load (`.venv/bin/pip install py-spy` first) and prints each scenario's top frames, the
event-loop threads summed; `--only SUBSTRING` runs the scenarios whose name contains it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import tomli_w

sys.path.insert(0, str(Path(__file__).parent))
from profile_roundtrip import py_spy, summarise  # a sibling script, found via the line above

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


def start_profiles(roots: list[int], tmp: Path, seconds: float,
                   ) -> list[subprocess.Popen[str]]:
    """py-spy on each node's process tree (supervisor and its workers), raw stacks."""
    spies = [subprocess.Popen(
        [py_spy(), "record", "--pid", str(pid), "--subprocesses", "--output",
         str(tmp / f"spy-{pid}.txt"), "--format", "raw", "--rate", "200",
         "--threads", "--duration", str(max(1, int(seconds))), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for pid in roots]
    time.sleep(0.5)  # py-spy attaches before the load starts
    return spies


def finish_profiles(spies: list[subprocess.Popen[str]], tmp: Path, seconds: float,
                    top: int) -> str:
    for spy in spies:
        _, err = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0:
            raise SystemExit(f"py-spy failed: {err.strip().splitlines()[-1:]}")
    merged = tmp / "spy-all.txt"
    merged.write_text("".join(p.read_text() for p in sorted(tmp.glob("spy-[0-9]*.txt"))))
    return summarise(merged, top)


async def scenario(name: str, backend: str, count: int, workers: int, args: argparse.Namespace,
                   cluster: PostgresCluster | None) -> Row:
    with tempfile.TemporaryDirectory(prefix="qpq-scale-") as raw:
        tmp = Path(raw)
        with nodes(tmp, backend, count, workers, cluster) as servers:
            async with clients(servers, args.connections, tmp) as conns:
                roots = [s.process.pid for s in servers]
                pg_roots = [postmaster_pid(cluster)] if cluster is not None else []
                spies = start_profiles(roots, tmp, args.seconds) if args.profile else []
                cpu0, pg0 = tree_cpu_s(roots), tree_cpu_s(pg_roots)
                done, latencies, elapsed = await load(conns, args.seconds)
                cpu1, pg1 = tree_cpu_s(roots), tree_cpu_s(pg_roots)
                if spies:
                    print(f"## {name}: {done / elapsed:.0f} round trips/s while sampled\n"
                          + finish_profiles(spies, tmp, args.seconds, args.top), flush=True)
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
    parser.add_argument("--only", default="",
                        help="run only the scenarios whose name contains this")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy every server process under load; print the top frames")
    parser.add_argument("--top", type=int, default=25, help="frames to print per profile")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every scenario; the table shows medians (default 1)")
    args = parser.parse_args()
    if args.seconds <= 0 or args.connections < 1 or args.wakes < 1 or args.workers < 2 \
            or args.repeat < 1 or args.top < 1:
        parser.error("--seconds > 0, --connections >= 1, --wakes >= 1, --workers >= 2, "
                     "--repeat >= 1, --top >= 1")
    n = args.workers
    chosen = [(name, backend, count, workers) for name, backend, count, workers in (
        ("sqlcipher, 1 node, workers=1", "sqlcipher", 1, 1),
        (f"sqlcipher, 1 node, workers={n}", "sqlcipher", 1, n),
        ("postgres, 1 node, workers=1", "postgres", 1, 1),
        (f"postgres, 1 node, workers={n}", "postgres", 1, n),
        ("postgres, 2 nodes, workers=1 each", "postgres", 2, 1)) if args.only in name]
    if not chosen:
        parser.error(f"no scenario name contains {args.only!r}")
    rounds: list[list[Row]] = []
    with ExitStack() as stack:
        cluster = stack.enter_context(postgres_cluster()) \
            if any(c[1] == "postgres" for c in chosen) else None
        for _ in range(args.repeat):  # every scenario once per round: runs alternate
            rounds.append([await scenario(name, backend, count, workers, args,
                                          cluster if backend == "postgres" else None)
                           for name, backend, count, workers in chosen])
    rows = [median_row([r[i] for r in rounds]) for i in range(len(chosen))]
    if args.json:
        print(json.dumps({"cores": os.cpu_count(), "connections": args.connections,
                          "seconds": args.seconds, "repeat": args.repeat,
                          "rows": [asdict(r) for r in rows],
                          "rounds": [[asdict(r) for r in rnd] for rnd in rounds]}, indent=2))
        return
    print(f"{os.cpu_count()} cores (client, servers and PostgreSQL share them); "
          f"{args.connections} connections, {args.seconds:g} s per scenario"
          + (f", medians of {args.repeat} alternating rounds" if args.repeat > 1 else "")
          + "\n")
    print(table(rows))
    if args.repeat > 1:
        print("\nEach round (round trips/s, qpq CPU ms/rt, PostgreSQL CPU ms/rt):")
        for i, (name, *_) in enumerate(chosen):
            print(f"- {name}: " + "; ".join(
                f"{r[i].round_trips_per_s:.0f}, {r[i].server_cpu_ms_per_rt:.2f}"
                + (f", {r[i].postgres_cpu_ms_per_rt:.2f}"
                   if r[i].postgres_cpu_ms_per_rt is not None else "") for r in rounds))


def median_row(runs: list[Row]) -> Row:
    """Each figure's median over the rounds of one scenario."""
    def med(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    first = runs[0]
    figures = {f: med([getattr(r, f) for r in runs]) for f in (
        "round_trips_per_s", "server_cpu_ms_per_rt", "postgres_cpu_ms_per_rt", "p50_ms",
        "p95_ms", "wake_p50_ms", "wake_p95_ms")}
    return replace(first, **figures)


if __name__ == "__main__":
    asyncio.run(main())
