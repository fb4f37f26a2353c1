"""Where qpq's server spends the ceiling's round trip: py-spy on the real server process.

    .venv/bin/pip install py-spy        # not a dependency: a tool for this script only
    .venv/bin/python bench/profile_roundtrip.py [--seconds S] [--conns N] [--top K]

Starts qpq through `qpq_server.devserver`, drives it with ceiling.py's load (its round
trip, `--round-trip`: by default enqueue + fetch carrying the previous ack) on N connections, samples the server with
`py-spy record --format raw` meanwhile, and prints the event-loop thread's top frames
by own time and by inclusive time (the other threads are the storage writer/readers,
mostly waiting). The figures in bench/README.md come from this.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import ceiling  # a sibling script, found through the path line above

from qpq_server.devserver import running_server


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def summarise(raw: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        # [process;[child process;]] thread; frames (--subprocesses nests the processes)
        head = next((i for i, f in enumerate(frames) if f.startswith("thread ")), 0)
        if "MainThread" not in frames[head] or head == len(frames) - 1:
            continue
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames[head + 1:]):
            inclusive[frame] += int(count)
    if total == 0:
        return "no samples of the event-loop thread"
    lines = [f"event-loop thread: {total} samples", "own time:"]
    lines += [f"  {c / total * 100:5.1f} %  {f}" for f, c in own.most_common(top)]
    lines.append("inclusive (below 90 %):")
    lines += [f"  {c / total * 100:5.1f} %  {f}"
              for f, c in inclusive.most_common(top * 3) if c / total < 0.9][:top]
    return "\n".join(lines)


async def profile(seconds: float, conns: int, out: Path,
                  round_trip: str = "carried") -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp, running_server(
            Path(tmp), overrides={"rate_limit": {"enabled": False}}) as srv:
        target = ceiling.Target("qpq", srv.address, srv.auth_token, srv.ca_cert,
                                srv.process.pid, True, ceiling.qpq_prepare(round_trip))
        await ceiling.load(target, conns, 1.0)  # warm up: accounts, caches
        spy = subprocess.Popen(
            [py_spy(), "record", "--pid", str(srv.process.pid), "--output", str(out),
             "--format", "raw", "--rate", "200", "--duration", str(int(seconds) + 1),
             "--threads", "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        result = await ceiling.load(target, conns, seconds)
        _, err = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0:
            raise SystemExit(f"py-spy failed: {err.strip().splitlines()[-1:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of load")
    parser.add_argument("--conns", type=int, default=10, help="connections")
    parser.add_argument("--top", type=int, default=20, help="frames to print")
    parser.add_argument("--round-trip", choices=sorted(ceiling.ROUND_TRIPS), default="carried",
                        help="qpq's round trip (see ceiling.py --help)")
    args = parser.parse_args()
    if args.seconds <= 0 or args.conns < 1 or args.top < 1:
        parser.error("--seconds must be > 0, --conns and --top >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        result = asyncio.run(profile(args.seconds, args.conns, raw, args.round_trip))
        print(f"{result['roundtrips_per_s']:.0f} round trips/s at {args.conns} connections "
              f"(p50 {result['p50_ms']:.1f} ms) while sampled")
        print(summarise(raw, args.top))


if __name__ == "__main__":
    main()
