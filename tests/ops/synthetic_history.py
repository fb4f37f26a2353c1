"""Fourteen days of chosen trends as OpenMetrics, for `promtool tsdb create-blocks-from`.

Three instances (job "node" and "qpq" series relabelled to one instance name each):
- `growing`: disk usage 50 % -> 64 % (+1 %/day), connections 100 -> 380 of 1,000
  (+20/day), 100 -> 380 messages/s (+20/s per day), blob storage 10 -> 24 GB (+1 GB/day),
  memory flat 40 %, queue flat 100;
  a `disk_usage` warning alert fired for two hours a week ago.
- `flat`: disk 40 %, memory 30 %, 50 of 1,000 connections, queue 10, 10 messages/s,
  5 GB of blobs.
- `young`: every measure but blob storage, only for the last `YOUNG_HOURS` hours.
`expected_*` give the dates the written trends imply.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DAY = 86_400.0
DAYS = 14
STEP_S = 180.0
YOUNG_HOURS = 12
GIB = 2**30
DISK = 100 * GIB
MEMORY = 8 * GIB
CONN_MAX = 1000


@dataclass(frozen=True)
class Shape:
    """Each measure as a function of days since the instance's history started."""

    disk_pct: Callable[[float], float]
    mem_pct: Callable[[float], float]
    conns: Callable[[float], float]
    queue: Callable[[float], float]
    msgs_per_s: float
    msgs_growth_per_s_day: float
    blob_gb: Callable[[float], float] | None = None


SHAPES = {
    "growing": Shape(lambda d: 50 + d, lambda d: 40.0, lambda d: 100 + 20 * d,
                     lambda d: 100.0, 100.0, 20.0, lambda d: 10 + d),
    "flat": Shape(lambda d: 40.0, lambda d: 30.0, lambda d: 50.0, lambda d: 10.0, 10.0, 0.0,
                  lambda d: 5.0),
    "young": Shape(lambda d: 20 + 10 * d, lambda d: 20.0, lambda d: 5.0, lambda d: 0.0,
                   0.0, 0.0),
}


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def history(now: float) -> str:
    """OpenMetrics text of every instance from 14 days (young: 12 h) before `now`."""
    rng = random.Random(18)
    series: dict[str, list[str]] = {}

    def add(metric: str, labels: dict[str, str], t: float, value: float) -> None:
        key = metric + _labels(**labels)
        series.setdefault(key, []).append(f"{key} {value!r} {t:.3f}")

    for instance, shape in SHAPES.items():
        start = now - (YOUNG_HOURS * 3600 if instance == "young" else DAYS * DAY)
        node = {"job": "node", "instance": instance}
        qpq = {"job": "qpq", "instance": instance}
        fs = {**node, "device": "/dev/vda1", "fstype": "ext4", "mountpoint": "/"}
        t = start
        while t <= now:
            d = (t - start) / DAY
            noise = rng.uniform(-0.2, 0.2)
            add("node_filesystem_size_bytes", fs, t, float(DISK))
            add("node_filesystem_avail_bytes", fs, t,
                DISK * (1 - (shape.disk_pct(d) + noise) / 100))
            add("node_memory_MemTotal_bytes", node, t, float(MEMORY))
            add("node_memory_MemAvailable_bytes", node, t,
                MEMORY * (1 - shape.mem_pct(d) / 100))
            add("qpq_connections_active", qpq, t, float(round(shape.conns(d))))
            add("qpq_connections_max", qpq, t, float(CONN_MAX))
            add("qpq_delivery_queue_depth", qpq, t, shape.queue(d))
            s = t - start
            enqueued = shape.msgs_per_s * s + shape.msgs_growth_per_s_day * s * s / (2 * DAY)
            add("qpq_enqueue_total", qpq, t, math.floor(enqueued))
            if shape.blob_gb is not None:
                add("qpq_blob_bytes", qpq, t, float(round(shape.blob_gb(d) * 1e9)))
            if instance == "growing" and now - 7 * DAY <= t <= now - 7 * DAY + 7200:
                add("ALERTS", {**node, "alertname": "QpqDiskUsageWarning",
                               "alertstate": "firing", "severity": "warning"}, t, 1.0)
            t += STEP_S
    lines = [line for key in sorted(series) for line in series[key]]
    return "\n".join(lines) + "\n# EOF\n"


# What the trends imply, as offsets from `now` in days.
EXPECTED_DISK_WARNING_DAYS = 70 - 64   # 64 % now, +1 %/day, warning above 70 %
EXPECTED_DISK_CRITICAL_DAYS = 90 - 64  # critical above 90 %
EXPECTED_CONN_WARNING_DAYS = (800 - 380) / 20   # 80 % of 1,000
EXPECTED_CONN_CRITICAL_DAYS = (950 - 380) / 20  # 95 % of 1,000
# 390 messages/s now (growing 380 + flat 10), +20/s per day; the test's calibration puts
# one worker at its process_cpu warning line at 500 messages/s.
EXPECTED_SECOND_WORKER_DAYS = (500 - 390) / 20


def calibration_needing_a_second_worker_above(tmp_path: Path, messages_per_s: float) -> Path:
    """A calibration whose CPU per message makes one worker reach the process_cpu
    warning line at exactly `messages_per_s` (at the forecast's peak factor)."""
    import dataclasses

    from qpq_ops.calibration import REFERENCE, dump
    from qpq_ops.forecast.outlook import DEFAULT_INPUTS
    from qpq_ops.triggers import get_trigger

    per_message = (get_trigger("process_cpu").warning / 100
                   / (messages_per_s * DEFAULT_INPUTS.peak_factor))
    third = per_message / 3
    path = tmp_path / "calibration.json"
    path.write_text(dump(dataclasses.replace(REFERENCE, cpu_s_per_enqueue=third,
                                             cpu_s_per_fetch=third, cpu_s_per_ack=third)))
    return path
