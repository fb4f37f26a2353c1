"""Throwaway local processes: a real `qpq-server` and Debian's node_exporter on loopback.

One launcher for `scripts/demo.py`, `bench/` and `tests/`::

    with running_server(tmp_path, overrides={"rate_limit": {"enabled": False}}) as srv:
        srv.metric("qpq_connections_active")          # one sample from /metrics
        async with srv.connect() as conn:             # token and CA filled in
            await conn.call("ping")

`init_server_dir` runs what `qpq-server init` runs and rewrites the listen addresses to free
127.0.0.1 ports; `start_server` waits for `/readyz` with a deadline; `stop()` sends TERM,
waits, then KILLs. `wait_until` / `await_until` poll a predicate until a deadline, so tests
never sleep-then-assert. The QUIC client (and so aioquic) is imported only by `connect()`.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import httpx
import tomli_w
from prometheus_client.parser import text_string_to_metric_families

from qpq_server.secrets import read_env_file

if TYPE_CHECKING:
    from qpq_server.client import QpqConnection

__all__ = [
    "BIN",
    "NODE_EXPORTER",
    "NodeExporter",
    "RunningServer",
    "await_until",
    "free_port",
    "init_server_dir",
    "rss_kb",
    "running_node_exporter",
    "running_server",
    "start_node_exporter",
    "start_server",
    "stop_process",
    "wait_until",
]

#: The console scripts installed beside this interpreter (the venv's bin/).
BIN = Path(sys.executable).parent
NODE_EXPORTER = Path("/usr/bin/prometheus-node-exporter")

T = TypeVar("T")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free on 127.0.0.1 for `kind` (TCP by default, SOCK_DGRAM for UDP)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kb(pid: int) -> int:
    """Resident set size of a process, from /proc (how tests and benches bound memory)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy (returned) or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not true within {timeout}s (last: {value!r})")
        time.sleep(interval)


async def await_until(predicate: Callable[[], T | Awaitable[T]], timeout: float, what: str,
                      interval: float = 0.05) -> T:
    """`wait_until` for async code: the predicate may be sync or async; the loop keeps running."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        value = cast(T, await result if inspect.isawaitable(result) else result)
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not true within {timeout}s (last: {value!r})")
        await asyncio.sleep(interval)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20.0,
                 sig: int = signal.SIGTERM) -> int:
    """Signal (TERM), wait up to `timeout`, then KILL; returns the exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    return int(process.returncode)


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_http_ready(url: str, process: subprocess.Popen[bytes], timeout: float, name: str,
                     log: Callable[[], str]) -> None:
    """Poll `url` for a 200 until `timeout`; a process that exits first fails at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited {process.returncode}:\n{log()}")
        if _http_ok(url):
            return
        time.sleep(0.1)
    stop_process(process)
    raise RuntimeError(f"{name} not ready in {timeout}s:\n{log()}")


def init_server_dir(data_dir: Path,
                    overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """`qpq-server init` into data_dir, move its listeners to free loopback ports, apply
    `overrides` ({section: {key: value}}); returns the config path.

    The command's own function runs in this process: a `qpq-server init` process cost
    ~0.5 CPU-s (the interpreter and CLI starting) for ~0.05 s of work, once per server
    of every test. The command line itself is tested on its own (tests/server/
    test_lifecycle.py, test_join.py)."""
    from qpq_server.datadir import init_data_dir  # lazily: keys and TLS only when asked

    init_data_dir(data_dir)  # its default domain, as `qpq-server init` without --domain
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
    """A `qpq-server run` subprocess and what a client needs to reach it."""

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
    server_name: str = "localhost"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.quic_port}"

    @asynccontextmanager
    async def connect(self, token: str | None = None, *, ca: Path | None = None,
                      timeout: float = 10.0, idle_timeout: float = 60.0,
                      hello: bool = True, local_host: str | None = None,
                      ) -> AsyncIterator[QpqConnection]:
        """A connected QUIC client; the server's own token and CA unless given
        (`local_host`: the client's source address, e.g. 127.0.0.2)."""
        from qpq_server.client import connect  # lazily: aioquic only when a test talks QUIC

        async with connect(self.address, self.auth_token if token is None else token,
                           ca=ca or self.ca_cert, server_name=self.server_name, timeout=timeout,
                           idle_timeout=idle_timeout, hello=hello,
                           local_host=local_host) as conn:
            yield conn

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

    def reloads(self) -> tuple[int, int]:
        """(done, failed): the SIGHUP reloads the server counted in qpq_reload_total."""
        return (int(self.metric("qpq_reload_total", result="ok")),
                int(self.metric("qpq_reload_total", result="failed")))

    def wait_reloaded(self, after: tuple[int, int], timeout: float = 10.0) -> None:
        """Until one more reload than `after` (a `reloads()` value) is counted as done;
        one more counted as failed raises RuntimeError with the log's tail."""
        def outcome() -> bool:
            done, failed = self.reloads()
            if failed > after[1]:
                raise RuntimeError(f"qpq-server reload failed:\n{self.log()[-2000:]}")
            return done > after[0]

        wait_until(outcome, timeout, "qpq-server counting a reload")

    def reload(self, timeout: float = 10.0) -> None:
        """SIGHUP, then wait until the server has re-read its tokens and certificate."""
        before = self.reloads()
        self.signal(signal.SIGHUP)
        self.wait_reloaded(before, timeout)

    def stop(self, timeout: float = 20.0) -> int:
        return stop_process(self.process, timeout)


def start_server(config_path: Path, *, env: Mapping[str, str] | None = None,
                 ready_timeout: float = 20.0, executable: Path | None = None,
                 base_env: Mapping[str, str] | None = None, log_path: Path | None = None,
                 server_name: str = "localhost") -> RunningServer:
    """Start `qpq-server run` on an initialised data dir and wait for /readyz.

    `executable` is another install's qpq-server (a deployed venv; default: this one's),
    `base_env` replaces the inherited environment (`env` is added on top), `log_path`
    defaults to server.log in the data dir, `server_name` is what clients check the
    certificate against."""
    config = tomllib.loads(config_path.read_text())
    data_dir = (config_path.parent / config["server"].get("data_dir", ".")).resolve()
    secrets = read_env_file(config_path.parent / ".env")
    log_path = log_path or data_dir / "server.log"
    # the server reads secrets from .env; stray QPQ_* from the caller's shell must not win
    inherited = os.environ if base_env is None else base_env
    proc_env = {k: v for k, v in inherited.items() if not k.startswith("QPQ_")}
    proc_env.update(env or {})
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [str(executable or BIN / "qpq-server"), "run", "--config", str(config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=proc_env,
        )
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
        server_name=server_name,
    )
    _wait_http_ready(metrics_url + "/readyz", process, ready_timeout, "qpq-server", server.log)
    return server


@contextmanager
def running_server(tmp_path: Path, *, overrides: dict[str, dict[str, Any]] | None = None,
                   env: dict[str, str] | None = None) -> Iterator[RunningServer]:
    """Init a fresh data dir under tmp_path, start the server, stop it afterwards."""
    config_path = init_server_dir(tmp_path / "qpq-data", overrides)
    server = start_server(config_path, env=env)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class NodeExporter:
    """Debian's prometheus-node-exporter on a free loopback port."""

    url: str
    hostport: str
    textfile_dir: Path | None
    process: subprocess.Popen[bytes]
    log_path: Path | None

    @property
    def metrics_url(self) -> str:
        return self.url + "/metrics"

    def stop(self) -> int:
        return stop_process(self.process, timeout=10)


def start_node_exporter(*, textfile_dir: Path | None = None, log_path: Path | None = None,
                        timeout: float = 15.0) -> NodeExporter:
    """Start node_exporter (reading `textfile_dir` when given) and wait for /metrics.

    A missing binary raises RuntimeError: tests fail rather than skip; the demo checks
    `NODE_EXPORTER.exists()` first because host metrics are optional there."""
    if not NODE_EXPORTER.exists():
        raise RuntimeError(f"{NODE_EXPORTER} missing: run scripts/install-sysdeps.sh")
    hostport = f"127.0.0.1:{free_port()}"
    args = [str(NODE_EXPORTER), f"--web.listen-address={hostport}"]
    if textfile_dir is not None:
        args.append(f"--collector.textfile.directory={textfile_dir}")
    if log_path is None:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        with log_path.open("wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    exporter = NodeExporter(f"http://{hostport}", hostport, textfile_dir, process, log_path)

    def log() -> str:
        return log_path.read_text(errors="replace") if log_path else "(no log kept)"

    _wait_http_ready(exporter.metrics_url, process, timeout, "node_exporter", log)
    return exporter


@contextmanager
def running_node_exporter(*, textfile_dir: Path | None = None, log_path: Path | None = None,
                          ) -> Iterator[NodeExporter]:
    """`start_node_exporter`, stopped when the block ends."""
    exporter = start_node_exporter(textfile_dir=textfile_dir, log_path=log_path)
    try:
        yield exporter
    finally:
        exporter.stop()
