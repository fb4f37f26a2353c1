"""`/readyz` reflects a live event loop, and a failed SIGHUP reload is counted."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry

from qpq_server.devserver import free_port, running_server, wait_until
from qpq_server.http import HealthServer
from qpq_server.liveness import LoopHeartbeat


def _status(url: str) -> int:
    return httpx.get(url, timeout=5).status_code


def test_readyz_fails_while_the_event_loop_is_wedged_and_healthz_stays_up() -> None:
    heartbeat = LoopHeartbeat(interval_s=0.05, stale_after_s=0.5)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    beat = asyncio.run_coroutine_threadsafe(heartbeat.run(), loop)
    port = free_port()
    health = HealthServer("127.0.0.1", port, CollectorRegistry(), heartbeat.alive)
    health.start()
    base = f"http://127.0.0.1:{port}"
    release = threading.Event()
    try:
        wait_until(lambda: _status(base + "/readyz") == 200, 10, "a beating loop to be ready")
        loop.call_soon_threadsafe(release.wait, 30)  # a handler that blocks the loop
        wait_until(lambda: _status(base + "/readyz") == 503, 10, "/readyz to see the wedge")
        assert _status(base + "/healthz") == 200
        release.set()
        wait_until(lambda: _status(base + "/readyz") == 200, 10, "/readyz to recover")
    finally:
        release.set()
        beat.cancel()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        health.stop()


def test_concurrent_health_checks_fit_in_the_listen_backlog() -> None:
    health = HealthServer("127.0.0.1", free_port(), CollectorRegistry(), lambda: True)
    health.start()
    try:
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{health.port}"],
                                   capture_output=True, text=True, check=True).stdout.split()
        assert listening[0] == "LISTEN" and int(listening[2]) >= 64, listening  # Send-Q
        with ThreadPoolExecutor(max_workers=32) as pool:
            codes = list(pool.map(lambda _: _status(f"http://127.0.0.1:{health.port}/healthz"),
                                  range(64)))
        assert codes == [200] * 64
    finally:
        health.stop()


def test_a_failed_sighup_reload_is_counted_and_the_server_keeps_serving(
        tmp_path: Path) -> None:
    with running_server(tmp_path) as srv:
        assert srv.metric("qpq_reload_total", result="failed") == 0
        cert = srv.data_dir / "tls" / "cert.pem"
        good = cert.read_bytes()
        cert.write_bytes(b"not a certificate")
        srv.signal(signal.SIGHUP)
        wait_until(lambda: srv.metric("qpq_reload_total", result="failed") == 1, 20,
              "the failed reload to be counted")
        assert _status(srv.metrics_url + "/readyz") == 200
        cert.write_bytes(good)
        srv.signal(signal.SIGHUP)
        wait_until(lambda: srv.metric("qpq_reload_total", result="ok") == 1, 20,
              "the good reload to be counted")


_EXHAUSTED_SERVER = r"""
import os, resource, sys, time
from prometheus_client import CollectorRegistry
from qpq_server.http import HealthServer

health = HealthServer("127.0.0.1", int(sys.argv[1]), CollectorRegistry(), lambda: True)
health.start()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
print(f"exhausted {len(held)}", flush=True)
time.sleep(60)
"""


def test_healthz_answers_while_the_process_is_out_of_descriptors(tmp_path: Path) -> None:
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _EXHAUSTED_SERVER, str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("exhausted")
        for _ in range(3):  # the spare descriptor comes back after each answer
            assert _status(f"http://127.0.0.1:{port}/healthz") == 200
    finally:
        proc.kill()
        proc.wait(10)
