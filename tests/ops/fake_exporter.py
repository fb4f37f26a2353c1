"""A small test exporter that serves chosen trigger inputs for several fake instances.

Each `FakeInstance` follows a timeline of `Profile`s (piecewise constant): gauges take
the profile's value, counters grow at the profile's rate, histograms receive 10
observations per second of the profile's value. The same function gives the samples at
any time, so `history()` (OpenMetrics for promtool backfill) and the live `/metrics`
page continue each other without a counter reset.

`/metrics` serves every instance with `instance` and `job` labels (scrape with
honor_labels): node_* series in `NODE_JOB`, the rest in `QPQ_JOB`, so the fakes are told
apart from real targets with `--job`/`--node-job`; `/metrics/NAME` serves one instance
without them (for direct mode).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.helpers.ports import free_port

QPQ_JOB = "fakeqpq"
NODE_JOB = "fakenode"
JOB_ARGS = ("--job", QPQ_JOB, "--node-job", NODE_JOB)
"""check-triggers options that select the fake instances."""
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
OBS_PER_S = 10.0
CPUS = ("0", "1")


@dataclass(frozen=True)
class Profile:
    cpu_busy: float | None = None          # percent
    mem_used: float | None = None          # percent
    disk_used: float | None = None         # percent of the root filesystem
    db_write_s: float | None = None        # every storage commit takes this long
    queue_depth: float | None = None
    rate_limit_per_min: float | None = None
    login_failures_per_min: float | None = None
    conn_active: float | None = None
    conn_max: float | None = None
    handshake_s: float | None = None
    enqueue_per_s: float | None = None
    worker_cpu: float | None = None        # percent of one core, busiest worker
    peer_up: float | None = None           # qpq_federation_peer_up of peer b.example
    peer_queue_per_min: float | None = None  # growth of b.example's outbound queue


# Inputs that put every trigger in one state.
OK = Profile(cpu_busy=20, mem_used=50, disk_used=40, db_write_s=0.003, queue_depth=10,
             rate_limit_per_min=30, login_failures_per_min=6, conn_active=10, conn_max=1000,
             handshake_s=0.03, enqueue_per_s=2, worker_cpu=20, peer_up=1,
             peer_queue_per_min=0)
WARN = Profile(cpu_busy=80, mem_used=80, disk_used=75, db_write_s=0.007, queue_depth=20_000,
               rate_limit_per_min=300, login_failures_per_min=120, conn_active=850,
               conn_max=1000, handshake_s=0.2, enqueue_per_s=3, worker_cpu=88, peer_up=1,
               peer_queue_per_min=6)
CRIT = Profile(cpu_busy=95, mem_used=95, disk_used=95, db_write_s=0.03, queue_depth=200_000,
               rate_limit_per_min=3000, login_failures_per_min=1200, conn_active=990,
               conn_max=1000, handshake_s=2.0, enqueue_per_s=5, worker_cpu=99, peer_up=0,
               peer_queue_per_min=6)


def expected_values(p: Profile) -> dict[str, float]:
    assert p.db_write_s is not None and p.handshake_s is not None
    assert p.conn_active is not None and p.conn_max is not None
    return {
        "process_cpu": p.worker_cpu,
        "cpu": p.cpu_busy, "memory": p.mem_used, "disk_usage": p.disk_used,
        "disk_io_latency": expected_p95(p.db_write_s), "delivery_queue_depth": p.queue_depth,
        "rate_limit_hits": p.rate_limit_per_min,
        "login_failures": p.login_failures_per_min,
        "connections": 100 * p.conn_active / p.conn_max,
        "tls_handshake_latency": expected_p95(p.handshake_s),
        # levels: 2 a peer down, 1 its queue growing, 0 fine
        "federation": 2 if p.peer_up == 0 else (1 if p.peer_queue_per_min else 0),
    }  # type: ignore[return-value]


def expected_p95(observed: float) -> float:
    """What histogram_quantile(0.95) gives when every observation is `observed`."""
    index = bisect.bisect_left(BUCKETS, observed)
    low = BUCKETS[index - 1] if index else 0.0
    return low + 0.95 * (BUCKETS[index] - low)


Sample = tuple[str, dict[str, str], float]


class FakeInstance:
    def __init__(self, name: str, timeline: list[tuple[float, Profile | None]]) -> None:
        self.name = name
        self.timeline = sorted(timeline, key=lambda seg: seg[0])

    def _profile(self, t: float) -> Profile | None:
        current = None
        for start, profile in self.timeline:
            if start <= t:
                current = profile
        return current

    def _integral(self, t: float, rate: str, scale: float = 1.0,
                  value_field: str | None = None, le: float | None = None) -> float:
        """Sum over segments up to t of rate x duration (optionally only observations <= le)."""
        total = 0.0
        for index, (start, profile) in enumerate(self.timeline):
            if start >= t or profile is None:
                continue
            end = min(t, self.timeline[index + 1][0] if index + 1 < len(self.timeline) else t)
            per_s = _rate(profile, rate)
            if per_s is None:
                continue
            if value_field is not None and le is not None:
                observed = getattr(profile, value_field)
                if observed is None or observed > le:
                    continue
            total += per_s * scale * (end - start)
        return total

    def samples(self, t: float) -> list[Sample]:
        p = self._profile(t)
        if p is None:
            return []
        out: list[Sample] = []
        if p.cpu_busy is not None:
            for cpu in CPUS:
                out.append(("node_cpu_seconds_total", {"cpu": cpu, "mode": "idle"},
                            self._integral(t, "cpu_idle")))
                out.append(("node_cpu_seconds_total", {"cpu": cpu, "mode": "user"},
                            self._integral(t, "cpu_busy")))
        if p.mem_used is not None:
            out.append(("node_memory_MemTotal_bytes", {}, 8e9))
            out.append(("node_memory_MemAvailable_bytes", {}, 8e9 * (1 - p.mem_used / 100)))
        if p.disk_used is not None:
            fs = {"device": "/dev/vda1", "fstype": "ext4", "mountpoint": "/"}
            tmp = {"device": "tmpfs", "fstype": "tmpfs", "mountpoint": "/run"}
            out.append(("node_filesystem_size_bytes", fs, 100e9))
            out.append(("node_filesystem_avail_bytes", fs, 100e9 * (1 - p.disk_used / 100)))
            # a full tmpfs must not count
            out.append(("node_filesystem_size_bytes", tmp, 1e9))
            out.append(("node_filesystem_avail_bytes", tmp, 0.0))
        for family, value_field in (("qpq_db_write_duration_seconds", "db_write_s"),
                                    ("qpq_tls_handshake_duration_seconds", "handshake_s")):
            if getattr(p, value_field) is not None:
                for le in BUCKETS:
                    out.append((f"{family}_bucket", {"le": repr(le)},
                                self._integral(t, value_field, value_field=value_field, le=le)))
                count = self._integral(t, value_field)
                out.append((f"{family}_bucket", {"le": "+Inf"}, count))
                out.append((f"{family}_count", {}, count))
                out.append((f"{family}_sum", {}, count * getattr(p, value_field)))
        if p.queue_depth is not None:
            out.append(("qpq_delivery_queue_depth", {}, p.queue_depth))
        if p.rate_limit_per_min is not None:
            out.append(("qpq_rate_limit_hit_total", {}, self._integral(t, "rate_limit_per_min")))
        if p.login_failures_per_min is not None:
            out.append(("qpq_auth_login_failure_total", {},
                        self._integral(t, "login_failures_per_min")))
        if p.conn_active is not None:
            out.append(("qpq_connections_active", {}, p.conn_active))
        if p.conn_max is not None:
            out.append(("qpq_connections_max", {}, p.conn_max))
        if p.enqueue_per_s is not None:
            out.append(("qpq_enqueue_total", {}, self._integral(t, "enqueue_per_s")))
        if p.worker_cpu is not None:
            # the busy worker and an idle one: the trigger takes the busiest
            out.append(("process_cpu_seconds_total", {"worker": "1"},
                        self._integral(t, "worker_cpu")))
            out.append(("process_cpu_seconds_total", {"worker": "2"}, 1.0))
        if p.peer_up is not None:
            # peer b.example as the profile says, and a healthy c.example beside it
            out.append(("qpq_federation_peer_up", {"peer": "b.example"}, p.peer_up))
            out.append(("qpq_federation_queue_depth", {"peer": "b.example"},
                        10 + self._integral(t, "peer_queue_per_min")))
            out.append(("qpq_federation_peer_up", {"peer": "c.example"}, 1.0))
            out.append(("qpq_federation_queue_depth", {"peer": "c.example"}, 3.0))
        return out


def _rate(profile: Profile, name: str) -> float | None:
    """Per-second growth of the counter `name` under `profile`."""
    if name == "cpu_idle":
        return None if profile.cpu_busy is None else 1 - profile.cpu_busy / 100
    if name == "cpu_busy":
        return None if profile.cpu_busy is None else profile.cpu_busy / 100
    if name in ("db_write_s", "handshake_s"):
        return None if getattr(profile, name) is None else OBS_PER_S
    if name in ("rate_limit_per_min", "login_failures_per_min", "peer_queue_per_min"):
        value = getattr(profile, name)
        return None if value is None else value / 60
    if name == "enqueue_per_s":
        return profile.enqueue_per_s
    if name == "worker_cpu":
        return None if profile.worker_cpu is None else profile.worker_cpu / 100
    raise KeyError(name)


def _job(metric: str) -> str:
    return NODE_JOB if metric.startswith("node_") else QPQ_JOB


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


class FakeExporter:
    def __init__(self, instances: list[FakeInstance]) -> None:
        self.instances = {i.name: i for i in instances}
        self.port = free_port()
        self.hostport = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.hostport}"

    def page(self, t: float, only: str | None = None) -> str:
        lines = []
        for name, instance in self.instances.items():
            if only is not None and name != only:
                continue
            for metric, labels, value in instance.samples(t):
                extra = {} if only is not None else {"instance": name, "job": _job(metric)}
                lines.append(f"{metric}{_labels({**labels, **extra})} {value!r}")
        return "\n".join(lines) + "\n"

    def history(self, start: float, end: float, step: float) -> str:
        """OpenMetrics text of every sample from start to end, for promtool backfill."""
        series: dict[str, list[str]] = {}
        t = start
        while t < end:
            for name, instance in self.instances.items():
                for metric, labels, value in instance.samples(t):
                    key = metric + _labels({**labels, "instance": name, "job": _job(metric)})
                    series.setdefault(key, []).append(f"{key} {value!r} {t:.3f}")
            t += step
        # OpenMetrics wants each family's samples together.
        lines = [line for key in sorted(series) for line in series[key]]
        return "\n".join(lines) + "\n# EOF\n"


@contextmanager
def serving(exporter: FakeExporter) -> Iterator[FakeExporter]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.rstrip("/")
            if path == "/metrics":
                body = exporter.page(time.time())
            elif path.startswith("/metrics/") and path[9:] in exporter.instances:
                body = exporter.page(time.time(), only=path[9:])
            else:
                self.send_error(404)
                return
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", exporter.port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield exporter
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


PROFILE_FIELDS = tuple(f.name for f in fields(Profile))
