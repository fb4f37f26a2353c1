"""Start a real `qpq-server` subprocess on loopback for tests.

Usage::

    with running_server(tmp_path) as srv:
        httpx.get(srv.metrics_url + "/metrics")
        # QUIC on 127.0.0.1:srv.quic_port, CA cert srv.ca_cert, token srv.auth_token

The data dir is made with `qpq-server init`; ports are probed free; the fixture waits
for `/readyz` with a deadline and always stops the process (TERM, wait, KILL).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from qpq_server.secrets import read_env_file
from tests.helpers.ports import free_port

BIN = Path(sys.executable).parent


def rss_kb(pid: int) -> int:
    """Resident set size of a process, from /proc (how tests and benches bound memory)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def init_data_dir(data_dir: Path, overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """`qpq-server init` into data_dir, then rewrite ports to free loopback ones."""
    subprocess.run(
        [str(BIN / "qpq-server"), "init", "--data-dir", str(data_dir)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    config_path = data_dir / "qpq-server.toml"
    config = tomllib.loads(config_path.read_text())
    config["server"]["listen"] = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    config.setdefault("metrics", {})["listen"] = f"127.0.0.1:{free_port()}"
    for section, values in (overrides or {}).items():
        config.setdefault(section, {}).update(values)
    config_path.write_text(tomli_w.dumps(config))
    return config_path


@dataclass
class RunningServer:
    data_dir: Path
    config_path: Path
    quic_port: int
    metrics_url: str
    auth_token: str
    db_key: str
    ca_cert: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.quic_port}"

    def metric(self, name: str, **labels: str) -> float:
        """The current value of one sample on /metrics (0.0 when it is absent)."""
        text = httpx.get(self.metrics_url + "/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return int(self.process.returncode)


def start_server(config_path: Path, *, env: dict[str, str] | None = None,
                 ready_timeout: float = 20.0) -> RunningServer:
    """Start `qpq-server run` on an initialised data dir and wait for /readyz."""
    config = tomllib.loads(config_path.read_text())
    data_dir = (config_path.parent / config["server"].get("data_dir", ".")).resolve()
    secrets = read_env_file(config_path.parent / ".env")
    log_path = data_dir / "server.log"
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("QPQ_")}
    proc_env.update(env or {})
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        [str(BIN / "qpq-server"), "run", "--config", str(config_path)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=proc_env,
    )
    log_file.close()
    metrics_url = "http://" + config["metrics"]["listen"]
    server = RunningServer(
        data_dir=data_dir,
        config_path=config_path,
        quic_port=int(config["server"]["listen"].rsplit(":", 1)[1]),
        metrics_url=metrics_url,
        auth_token=(env or {}).get("QPQ_AUTH_TOKEN", secrets.get("QPQ_AUTH_TOKEN", "")),
        db_key=(env or {}).get("QPQ_DB_KEY", secrets.get("QPQ_DB_KEY", "")),
        ca_cert=data_dir / "tls" / "cert.pem",
        process=process,
        log_path=log_path,
        env=proc_env,
    )
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"qpq-server exited {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(metrics_url + "/readyz", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"qpq-server not ready in {ready_timeout}s:\n{server.log()}")


@contextmanager
def running_server(tmp_path: Path, *, overrides: dict[str, dict[str, Any]] | None = None,
                   env: dict[str, str] | None = None) -> Iterator[RunningServer]:
    """Init a fresh data dir under tmp_path, start the server, stop it afterwards."""
    data_dir = tmp_path / "qpq-data"
    config_path = init_data_dir(data_dir, overrides)
    server = start_server(config_path, env=env)
    try:
        yield server
    finally:
        server.stop()
