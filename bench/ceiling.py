"""qpq against the ceiling: a bare aioquic echo server, same load generator, same run.

    .venv/bin/python bench/ceiling.py [--quick] [--json] [--seconds S] [--idle N]

The ceiling is the most a Python QUIC server can do here: an aioquic server that echoes
one length-prefixed frame on each new bidirectional stream. Both servers run as their
own process on loopback and are driven by qpq's own client (`_ClientProtocol.request`:
one frame out on a new stream, one frame back), so the only difference is the server.

* round trips per second and p50/p95/p99 at 1, 10 and 100 connections (qpq's round
  trip: one E2E-sized message enqueued, durable, and fetched by a fetch that carries
  the previous message's ack, as `qpq-client recv` does: two requests; the echo's: one
  frame). `--round-trip separate` is the old three (enqueue, fetch, ack),
  `--round-trip pipelined` sends the enqueue and the fetch of the previous message at
  once, and `--compare-round-trips` loads qpq every way in one run; CPU per round trip
  of the server (from /proc) and of the load generator is printed with each;
* handshakes per second and handshake p95 with 16 concurrent connects;
* server RSS per idle connection with `--idle` idle connections.

`--json` prints one object; the ratios compare qpq with aioquic (round trips at 10
connections). `--compare-loops` also runs qpq on the other event loop (uvloop when the
default is asyncio, and the reverse; see qpq_server/eventloop.py) in the same run;
`--qh3` adds the same echo server on qh3 (a faster fork of aioquic's QUIC stack, `pip
install qh3`; not a dependency) as a reference line. `--quick` (1 and 10 connections, 2 s each, 200 idle) finishes in under a
minute. Client and servers share the machine's cores: compare figures within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamDataReceived

from qpq_server.client import QpqConnection, connect
from qpq_server.protocol.codec import HEADER_BYTES

if TYPE_CHECKING:
    from qpq_server.devserver import RunningServer

ALPN = "qpq/1"
HANDSHAKE_CONCURRENCY = 16
HANDSHAKE_ROUNDS = 3  # per target, alternating with the other target


# -- the ceiling: a bare aioquic echo server (runs as `ceiling.py --echo-server`) ---------

def echo_protocol(base: type[Any], stream_data: type[Any]) -> type[Any]:
    """An echo protocol on `base` (aioquic's QuicConnectionProtocol, or qh3's)."""

    class EchoProtocol(base):  # type: ignore[misc,valid-type]
        """Echo the first length-prefixed frame of each stream, then end the stream."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._buffers: dict[int, bytearray] = {}

        def quic_event_received(self, event: object) -> None:
            if not isinstance(event, stream_data):
                return
            buf = self._buffers.setdefault(event.stream_id, bytearray())
            buf.extend(event.data)
            if len(buf) >= HEADER_BYTES:
                length = int.from_bytes(buf[:HEADER_BYTES], "big")
                if len(buf) >= HEADER_BYTES + length:
                    self._quic.send_stream_data(event.stream_id,
                                                bytes(buf[:HEADER_BYTES + length]),
                                                end_stream=True)
                    del self._buffers[event.stream_id]
                    self.transmit()

    return EchoProtocol


async def echo_server(port: int, cert: str, key: str, stack: str = "aioquic") -> None:
    if stack == "qh3":  # a faster fork of aioquic's QUIC stack: a reference line only
        from qh3.asyncio import QuicConnectionProtocol as Qh3Protocol
        from qh3.asyncio import serve as qh3_serve
        from qh3.quic.configuration import QuicConfiguration as Qh3Configuration
        from qh3.quic.events import StreamDataReceived as Qh3StreamData

        qconfig = Qh3Configuration(is_client=False, alpn_protocols=[ALPN], idle_timeout=300)
        qconfig.load_cert_chain(cert, key)
        await qh3_serve("127.0.0.1", port, configuration=qconfig,
                        create_protocol=echo_protocol(Qh3Protocol, Qh3StreamData))
    else:
        config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN], idle_timeout=300)
        config.load_cert_chain(cert, key)
        await serve("127.0.0.1", port, configuration=config,
                    create_protocol=echo_protocol(QuicConnectionProtocol, StreamDataReceived))
    print("ready", flush=True)
    await asyncio.Event().wait()


# -- one target under load -----------------------------------------------------------------

@dataclass
class Target:
    name: str
    address: str
    token: str
    ca: Path
    pid: int
    hello: bool
    prepare: Callable[[QpqConnection, int], Awaitable[Callable[[], Awaitable[None]]]]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def open_conns(t: Target, n: int, stack: AsyncExitStack,
                     durations: list[float] | None = None,
                     hello: bool | None = None) -> list[QpqConnection]:
    sem = asyncio.Semaphore(HANDSHAKE_CONCURRENCY)

    async def one() -> QpqConnection:
        async with sem:
            started = time.perf_counter()
            conn = await stack.enter_async_context(connect(
                t.address, t.token, ca=t.ca, server_name="localhost", timeout=60,
                idle_timeout=300, hello=t.hello if hello is None else hello))
            if durations is not None:
                durations.append(time.perf_counter() - started)
            return conn

    return list(await asyncio.gather(*(one() for _ in range(n))))


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(t: Target, n: int, seconds: float) -> dict[str, float]:
    async with AsyncExitStack() as stack:
        conns = await open_conns(t, n, stack)
        loops = [await t.prepare(c, i) for i, c in enumerate(conns)]
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker(step: Callable[[], Awaitable[None]]) -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await step()
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        server_cpu, client_cpu = cpu_seconds(t.pid), time.process_time()
        await asyncio.gather(*(worker(s) for s in loops))
        elapsed = time.perf_counter() - began
        server_cpu, client_cpu = (cpu_seconds(t.pid) - server_cpu,
                                  time.process_time() - client_cpu)
    done = max(len(latencies), 1)
    # CPU per round trip, both sides: with client and server sharing the cores, the
    # rate follows their sum (the load generator is qpq's own Python client).
    return {"roundtrips_per_s": len(latencies) / elapsed, "p50_ms": pct(latencies, .5) * 1e3,
            "p95_ms": pct(latencies, .95) * 1e3, "p99_ms": pct(latencies, .99) * 1e3,
            "server_cpu_ms_per_rt": server_cpu / done * 1e3,
            "client_cpu_ms_per_rt": client_cpu / done * 1e3}


async def handshakes(t: Target, total: int) -> dict[str, float]:
    return (await alternating_handshakes([t], total, rounds=1))[t.name]


async def alternating_handshakes(targets: list[Target], total: int,
                                 rounds: int) -> dict[str, dict[str, float]]:
    """`total` handshakes on each target in turn, `rounds` times.

    Each target is measured in the same client state: a target measured after another's
    load and idle-connection phases had a 1.5-3x slower p95, whichever target it was."""
    durations: dict[str, list[float]] = {t.name: [] for t in targets}
    elapsed = dict.fromkeys(durations, 0.0)
    for _ in range(rounds):
        for t in targets:
            async with AsyncExitStack() as stack:
                began = time.perf_counter()
                # the handshake alone
                await open_conns(t, total, stack, durations[t.name], hello=False)
                elapsed[t.name] += time.perf_counter() - began
    return {name: {"handshakes_per_s": rounds * total / elapsed[name],
                   "handshake_p95_ms": pct(durations[name], .95) * 1e3}
            for name in durations}


async def idle_rss(t: Target, n: int) -> float:
    from qpq_server.devserver import rss_kb

    async with AsyncExitStack() as stack:
        await asyncio.sleep(0.5)
        before = rss_kb(t.pid)
        await open_conns(t, n, stack)
        await asyncio.sleep(1.0)
        after = rss_kb(t.pid)
    return (after - before) * 1024 / n


def echo_prepare() -> Callable[[QpqConnection, int], Awaitable[Callable[[], Awaitable[None]]]]:
    async def prepare(conn: QpqConnection, index: int) -> Callable[[], Awaitable[None]]:
        message = {"op": "ping", "payload": b"x" * 200}

        async def step() -> None:
            await conn.call_raw(message)

        return step

    return prepare


ROUND_TRIPS = {
    "carried": "enqueue, then fetch carrying the previous message's ack (2 requests)",
    "separate": "enqueue, fetch, ack (3 requests: before fetch carried acks)",
    "pipelined": "enqueue and, in flight with it, fetch of the previous message carrying"
                 " the ack of the one before (2 requests at once)",
}
"""What a qpq round trip is: one E2E-sized message enqueued (durable) and fetched."""


def qpq_prepare(round_trip: str = "carried",
                ) -> Callable[[QpqConnection, int], Awaitable[Callable[[], Awaitable[None]]]]:
    import opaque_ke_py as opaque

    password = b"ceiling bench password"

    async def prepare(conn: QpqConnection, index: int) -> Callable[[], Awaitable[None]]:
        user = f"c{index}-{os.urandom(4).hex()}"
        start = opaque.client_registration_start(password)
        r = await conn.call("register_start", username=user, request=start.get_message())
        fin = opaque.client_registration_finish(password, start.get_state(), r["response"])
        await conn.call("register_finish", username=user, upload=fin.get_message())
        start = opaque.client_login_start(password)
        r = await conn.call("login_start", username=user, request=start.get_message())
        fin = opaque.client_login_finish(password, start.get_state(), r["response"])
        sess = (await conn.call("login_finish", login_id=r["login_id"],
                                finalization=fin.get_message()))["session"]
        payload = b"x" * 200
        shown: list[int] = []  # fetched, acked by the next fetch (as `qpq-client recv`)

        async def carried() -> None:
            await conn.call("enqueue", session=sess, recipients=[user], payload=payload)
            got = await conn.call("fetch", session=sess, limit=1, ack=shown)
            shown[:] = [m["id"] for m in got["messages"]]

        async def separate() -> None:
            await conn.call("enqueue", session=sess, recipients=[user], payload=payload)
            got = await conn.call("fetch", session=sess, limit=1)
            await conn.call("ack", session=sess, ids=[m["id"] for m in got["messages"]])

        async def pipelined() -> None:  # order does not matter between the two
            _, got = await asyncio.gather(
                conn.call("enqueue", session=sess, recipients=[user], payload=payload),
                conn.call("fetch", session=sess, limit=1, ack=shown))
            shown[:] = [m["id"] for m in got["messages"]]

        return {"carried": carried, "separate": separate, "pipelined": pipelined}[round_trip]

    return prepare


async def measure_target(target: Target, conn_counts: list[int], seconds: float,
                         total_handshakes: int, idle: int, load_only: bool = False,
                         handshakes_apart: bool = False) -> dict[str, Any]:
    """Load at each connection count, handshakes (unless the caller measures them apart,
    alternating targets), then RSS per idle connection."""
    per_n = {str(n): await load(target, n, seconds) for n in conn_counts}
    if load_only:
        return {"load": per_n}
    shakes = {} if handshakes_apart else await handshakes(target, total_handshakes)
    return {"load": per_n, **shakes, "rss_per_conn_bytes": await idle_rss(target, idle)}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    # Imported here: the echo server subprocess needs none of the launcher.
    from qpq_server.devserver import running_server
    from qpq_server.eventloop import loop_name

    conn_counts = [1, 10] if args.quick else [1, 10, 100]
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    idle = args.idle or (200 if args.quick else 1000)
    total_handshakes = 32 if args.quick else 64
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                               "seconds": seconds, "idle_connections": idle}
    overrides = {"rate_limit": {"enabled": False},
                 "quic": {"max_unauthenticated_per_address": idle + 64}}
    results["qpq_event_loop"] = loop_name("auto")
    results["qpq_round_trip"] = ROUND_TRIPS[args.round_trip]
    with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp),
                                                              overrides=overrides) as srv:
        echo = start_echo(srv)
        try:
            targets = {
                "aioquic": Target("aioquic", f"127.0.0.1:{echo[1]}", "", srv.ca_cert,
                                  echo[0].pid, False, echo_prepare()),
                "qpq": Target("qpq", srv.address, srv.auth_token, srv.ca_cert,
                              srv.process.pid, True, qpq_prepare(args.round_trip)),
            }
            for name, target in targets.items():
                results[name] = await measure_target(target, conn_counts, seconds,
                                                     total_handshakes, idle,
                                                     handshakes_apart=True)
            # After both targets' other phases, so both are measured in one client state.
            shakes = await alternating_handshakes(list(targets.values()), total_handshakes,
                                                  HANDSHAKE_ROUNDS)
            for name, measured in shakes.items():
                results[name].update(measured)
            if args.compare_round_trips:  # the other round trips, same server, same run
                for other in (r for r in ROUND_TRIPS if r != args.round_trip):
                    results[f"qpq_{other}"] = await measure_target(
                        Target("qpq", srv.address, srv.auth_token, srv.ca_cert,
                               srv.process.pid, True, qpq_prepare(other)),
                        conn_counts, seconds, total_handshakes, idle, load_only=True)
            if args.qh3:
                qh3_echo = start_echo(srv, "qh3")
                try:
                    results["qh3_echo"] = await measure_target(
                        Target("qh3", f"127.0.0.1:{qh3_echo[1]}", "", srv.ca_cert,
                               qh3_echo[0].pid, False, echo_prepare()),
                        conn_counts, seconds, total_handshakes, idle)
                finally:
                    qh3_echo[0].kill()
                    qh3_echo[0].wait()
            if args.compare_loops:
                other = "asyncio" if results["qpq_event_loop"] == "uvloop" else "uvloop"
                with tempfile.TemporaryDirectory() as tmp2, running_server(
                        Path(tmp2), overrides=overrides, env={"QPQ_EVENT_LOOP": other},
                ) as srv2:
                    results[f"qpq_on_{other}"] = await measure_target(
                        Target("qpq", srv2.address, srv2.auth_token, srv2.ca_cert,
                               srv2.process.pid, True, qpq_prepare(args.round_trip)),
                        conn_counts, seconds, total_handshakes, idle)
        finally:
            echo[0].kill()
            echo[0].wait()
    q, a = results["qpq"], results["aioquic"]
    results.update({
        "qpq_roundtrips_per_s": q["load"]["10"]["roundtrips_per_s"],
        "aioquic_roundtrips_per_s": a["load"]["10"]["roundtrips_per_s"],
        "qpq_rss_per_conn_bytes": q["rss_per_conn_bytes"],
        "aioquic_rss_per_conn_bytes": a["rss_per_conn_bytes"],
        "handshake_p95_ms": q["handshake_p95_ms"],
        "aioquic_handshake_p95_ms": a["handshake_p95_ms"],
    })
    results["roundtrip_ratio"] = results["qpq_roundtrips_per_s"] / results[
        "aioquic_roundtrips_per_s"]
    results["rss_per_conn_ratio"] = (results["qpq_rss_per_conn_bytes"]
                                     / max(results["aioquic_rss_per_conn_bytes"], 1.0))
    results["handshake_p95_ratio"] = q["handshake_p95_ms"] / a["handshake_p95_ms"]
    return results


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_echo(srv: RunningServer, stack: str = "aioquic") -> tuple[subprocess.Popen[str], int]:
    port = free_udp_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--echo-server", str(port), str(srv.ca_cert),
         str(srv.data_dir / "tls" / "key.pem"), stack], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise SystemExit(f"the {stack} echo server did not start")
    return proc, port


def print_table(r: dict[str, Any]) -> None:
    print(f"qpq round trip: {r['qpq_round_trip']}; aioquic's: one frame echoed")
    print(f"{'':24}{'aioquic echo':>16}{'qpq':>16}{'qpq/aioquic':>14}")
    for n in r["qpq"]["load"]:
        a, q = r["aioquic"]["load"][n], r["qpq"]["load"][n]
        print(f"round trips/s @ {n:>3} conns{a['roundtrips_per_s']:>14.0f}"
              f"{q['roundtrips_per_s']:>16.0f}{q['roundtrips_per_s'] / a['roundtrips_per_s']:>14.2f}")
        for p in ("p50_ms", "p95_ms", "p99_ms", "server_cpu_ms_per_rt",
                  "client_cpu_ms_per_rt"):
            print(f"  {p:<22}{a[p]:>14.2f}{q[p]:>16.2f}{q[p] / a[p]:>14.2f}")
    for key, label in (("handshakes_per_s", "handshakes/s (16 conc.)"),
                       ("handshake_p95_ms", "handshake p95 ms"),
                       ("rss_per_conn_bytes", "RSS per idle conn (B)")):
        a, q = r["aioquic"][key], r["qpq"][key]
        print(f"{label:<24}{a:>16.1f}{q:>16.1f}{q / a if a else float('nan'):>14.2f}")
    for key in [k for k in r if k.startswith("qpq_on_") or k == "qh3_echo"
                or k[4:] in ROUND_TRIPS]:
        o, a = r[key], r["aioquic"]
        loads = ", ".join(f"{o['load'][n]['roundtrips_per_s']:.0f} rt/s @ {n} "
                          f"({o['load'][n]['roundtrips_per_s'] / a['load'][n]['roundtrips_per_s']:.2f})"
                          for n in o["load"])
        if key[4:] in ROUND_TRIPS:
            print(f"qpq, round trip {ROUND_TRIPS[key[4:]]}: {loads} [ratio to aioquic echo]")
            continue
        label = ("qh3 echo (reference)" if key == "qh3_echo"
                 else f"qpq on {key[7:]} (default: {r['qpq_event_loop']})")
        print(f"{label}: {loads} [ratio to aioquic echo]; handshake p95 "
              f"{o['handshake_p95_ms']:.1f} ms; RSS/conn {o['rss_per_conn_bytes']:.0f} B")
    print(f"targets: roundtrip_ratio {r['roundtrip_ratio']:.2f} (>= 0.5), rss_per_conn_ratio "
          f"{r['rss_per_conn_ratio']:.2f} (<= 1.0), handshake_p95_ratio "
          f"{r['handshake_p95_ratio']:.2f} (<= 1.25)")


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--echo-server":
        asyncio.run(echo_server(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 and 10 connections, 2 s each")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=0.0, help="seconds per load step")
    parser.add_argument("--idle", type=int, default=0, help="idle connections for RSS")
    parser.add_argument("--qh3", action="store_true",
                        help="also run a qh3 echo server (pip install qh3) as a reference")
    parser.add_argument("--compare-loops", action="store_true",
                        help="also run qpq on the other event loop (asyncio / uvloop)")
    parser.add_argument("--round-trip", choices=sorted(ROUND_TRIPS), default="carried",
                        help="qpq's round trip: " + "; ".join(
                            f"{k}: {v}" for k, v in ROUND_TRIPS.items()))
    parser.add_argument("--compare-round-trips", action="store_true",
                        help="also load qpq with the other round trips in the same run")
    args = parser.parse_args()
    results = asyncio.run(measure(args))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)


if __name__ == "__main__":
    main()
