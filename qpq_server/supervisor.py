"""`qpq-server run` with `[server] workers > 1`: keep N worker processes alive.

A small arbiter in the manner of gunicorn's: signal handlers only note the signal and
wake the main loop through a self-pipe; the loop handles one event at a time. It does
no request handling. It:

- starts N workers (`python -m qpq_server.worker`), each an aioquic listener on the same
  UDP port with SO_REUSEPORT; each reports "ready" and then a heartbeat on a pipe;
- restarts a worker that dies after it was ready, with backoff; a worker that dies
  before it was ever ready (bad config, port taken, wrong DB key) stops everything with
  exit 1, rather than respawning in a tight loop;
- forwards SIGHUP; on SIGTERM/SIGINT lets every worker drain, then exits 0;
- serves `/metrics` for the host (prometheus_client's multiprocess collector over the
  workers' files, plus per-worker `process_*`), `/healthz`, and `/readyz` (every worker
  ready and beating).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qpq_server.config import Config, load_config, parse_hostport
from qpq_server.errors import ConfigError
from qpq_server.fsutil import write_atomic

__all__ = ["Supervisor"]

log = logging.getLogger("qpq.supervisor")

_BEAT_STALE_S = 5.0
_BACKOFF_MAX_S = 30.0
_HEALTHY_RESET_S = 60.0


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    pipe: int | None = None
    ready: bool = False
    last_beat: float = 0.0
    started: float = 0.0
    failures: int = 0
    respawn_at: float | None = None
    buffer: bytearray = field(default_factory=bytearray)


class Supervisor:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config: Config = load_config(config_path)
        self.count = self.config.server.worker_count
        self.metrics_dir = self.config.data_dir / "run" / "metrics"
        self.workers = [_Worker(i) for i in range(self.count)]
        self._selector = selectors.DefaultSelector()
        self._signals: list[int] = []
        self._stopping = False

    # -- what /readyz and /metrics see (asked from the HTTP thread) ---------------------
    def is_ready(self) -> bool:
        now = time.monotonic()
        return not self._stopping and all(
            w.ready and now - w.last_beat <= _BEAT_STALE_S for w in self.workers)

    def pids(self) -> dict[str, int]:
        pids = {"supervisor": os.getpid()}
        for w in self.workers:
            if w.process is not None and w.process.poll() is None:
                pids[str(w.index)] = w.process.pid
        return pids

    # -- lifecycle ---------------------------------------------------------------------
    def run(self) -> int:
        self._prepare_metrics_dir()
        # Imported here: prometheus_client must see PROMETHEUS_MULTIPROC_DIR first.
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from qpq_server.http import HealthServer
        from qpq_server.procstats import WorkerProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_dir))  # type: ignore[no-untyped-call]
        registry.register(WorkerProcessCollector(self.pids))
        host, port = parse_hostport(self.config.metrics.listen)
        try:
            health = HealthServer(host, port, registry, self.is_ready)
        except OSError as exc:
            raise ConfigError(f"cannot listen on TCP {self.config.metrics.listen} for "
                              f"metrics: {exc.strerror}") from None
        health.start()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        self._selector.register(wake_r, selectors.EVENT_READ, None)
        previous = signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._note_signal)
        pid_path = self.config.pid_path
        write_atomic(pid_path, f"{os.getpid()}\n", mode=0o600, sync_dir=False)
        try:
            for worker in self.workers:
                self._spawn(worker)
            log.info("supervising", extra={"workers": self.count,
                                           "listen": self.config.server.listen})
            return self._loop(wake_r)
        finally:
            self._stop_all()
            signal.set_wakeup_fd(previous)
            health.stop()
            with contextlib.suppress(OSError):
                pid_path.unlink()

    def _prepare_metrics_dir(self) -> None:
        # Files of a previous run would be summed into this one's counters.
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True, mode=0o700)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)

    def _note_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _loop(self, wake_r: int) -> int:
        while True:
            for key, _ in self._selector.select(timeout=0.5):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 4096)
                else:
                    self._read_pipe(key.data)
            while self._signals:
                sig = self._signals.pop(0)
                if sig in (signal.SIGTERM, signal.SIGINT):
                    log.info("stopping: draining every worker")
                    return 0
                if sig == signal.SIGHUP:
                    self._forward(signal.SIGHUP)
            failed = self._reap()
            if failed is not None:
                return failed
            self._respawn_due()

    # -- workers -----------------------------------------------------------------------
    def _spawn(self, worker: _Worker) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        cmd = [sys.executable, "-m", "qpq_server.worker", "--config", str(self.config_path),
               "--index", str(worker.index), "--count", str(self.count),
               "--pipe-fd", str(write_fd)]
        worker.process = subprocess.Popen(cmd, pass_fds=(write_fd,))
        os.close(write_fd)
        worker.pipe, worker.ready, worker.buffer = read_fd, False, bytearray()
        worker.started, worker.respawn_at = time.monotonic(), None
        self._selector.register(read_fd, selectors.EVENT_READ, worker)

    def _read_pipe(self, worker: _Worker) -> None:
        assert worker.pipe is not None
        try:
            data = os.read(worker.pipe, 4096)
        except BlockingIOError:
            return
        if not data:
            self._close_pipe(worker)
            return
        worker.last_beat = time.monotonic()
        if b"R" in data and not worker.ready:
            worker.ready = True
            log.info("worker ready", extra={"worker": worker.index,
                                            "pid": worker.process.pid if worker.process else 0})

    def _close_pipe(self, worker: _Worker) -> None:
        if worker.pipe is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(worker.pipe)
            os.close(worker.pipe)
            worker.pipe = None

    def _reap(self) -> int | None:
        """Collect exited workers; a boot failure stops the supervisor (exit 1)."""
        from prometheus_client import multiprocess

        for worker in self.workers:
            process = worker.process
            if process is None or process.poll() is None:
                continue
            self._close_pipe(worker)
            multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                process.pid, str(self.metrics_dir))
            worker.process = None
            if not worker.ready:
                log.error("worker failed to start; stopping",
                          extra={"worker": worker.index, "exit": process.returncode})
                return 1
            uptime = time.monotonic() - worker.started
            worker.failures = 0 if uptime > _HEALTHY_RESET_S else worker.failures + 1
            delay = min(_BACKOFF_MAX_S, 0.5 * 2 ** worker.failures) if worker.failures else 0.0
            worker.respawn_at = time.monotonic() + delay
            log.warning("worker exited; restarting", extra={
                "worker": worker.index, "exit": process.returncode, "in_s": delay})
        return None

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.process is None and worker.respawn_at is not None \
                    and now >= worker.respawn_at:
                self._spawn(worker)

    def _forward(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(sig)

    def _stop_all(self) -> None:
        """TERM every worker (each drains: parked fetches answered, in-flight requests
        committed), wait for the grace period, then KILL what is left."""
        self._stopping = True
        self._forward(signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_grace_s + 10
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop in time; killing", extra={"worker": worker.index})
                process.kill()
                process.wait()
            self._close_pipe(worker)
