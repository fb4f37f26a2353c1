"""`process_*` metrics for each worker process, labelled `worker`, from /proc.

In multi-worker mode the supervisor serves `/metrics`; prometheus_client's own
ProcessCollector only describes the process it runs in, and one worker pinned at 100 %
of a core is the real limit whatever the host average says, so each worker (and the
supervisor itself, `worker="supervisor"`) gets its own series.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["WorkerProcessCollector"]

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _boot_time(proc: Path) -> float:
    for line in (proc / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def _max_fds(proc_pid: Path) -> float | None:
    for line in (proc_pid / "limits").read_text().splitlines():
        if line.startswith("Max open files"):
            value = line.split()[3]
            return None if value == "unlimited" else float(value)
    return None


class WorkerProcessCollector(Collector):
    def __init__(self, pids: Callable[[], Mapping[str, int]], proc: Path = Path("/proc")) -> None:
        self._pids = pids
        self._proc = proc

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        cpu = CounterMetricFamily("process_cpu_seconds_total",
                                  "Total user and system CPU time spent in seconds.",
                                  labels=["worker"])
        rss = GaugeMetricFamily("process_resident_memory_bytes",
                                "Resident memory size in bytes.", labels=["worker"])
        fds = GaugeMetricFamily("process_open_fds", "Number of open file descriptors.",
                                labels=["worker"])
        max_fds = GaugeMetricFamily("process_max_fds",
                                    "Maximum number of open file descriptors.",
                                    labels=["worker"])
        start = GaugeMetricFamily("process_start_time_seconds",
                                  "Start time of the process since unix epoch in seconds.",
                                  labels=["worker"])
        boot = _boot_time(self._proc)
        for name, pid in sorted(self._pids().items()):
            base = self._proc / str(pid)
            try:
                # Fields after the command name (which may contain spaces) in /proc/PID/stat.
                fields = (base / "stat").read_text().rsplit(")", 1)[1].split()
                open_fds = len(os.listdir(base / "fd"))
                limit = _max_fds(base)
            except (OSError, IndexError):
                continue  # the worker is gone or restarting: no series rather than a stale one
            cpu.add_metric([name], (int(fields[11]) + int(fields[12])) / _TICKS)
            rss.add_metric([name], int(fields[21]) * _PAGE)
            start.add_metric([name], boot + int(fields[19]) / _TICKS)
            fds.add_metric([name], open_fds)
            if limit is not None:
                max_fds.add_metric([name], limit)
        return [cpu, rss, fds, max_fds, start]
