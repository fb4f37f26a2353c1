"""Start a real Prometheus (the Debian `prometheus` package) on loopback for tests.

Usage::

    from tests.helpers.prometheus import ScrapeJob, running_prometheus

    jobs = [ScrapeJob("qpq", [server_hostport]),
            ScrapeJob("node", [node_hostport], instance="node1")]
    with running_prometheus(tmp_path, jobs, scrape_interval="1s") as prom:
        prom.wait_for_targets_up()
        prom.query('up{job="qpq"}')          # -> list of {"metric": ..., "value": [t, "1"]}
        prom.url                             # http://127.0.0.1:PORT

API
- `ScrapeJob(job, targets, honor_labels=False, instance=None, metrics_path="/metrics")`:
  one `scrape_configs` entry; `instance` relabels every target's `instance` label (so a
  node's qpq server and node_exporter can share one), `honor_labels` keeps the labels
  the target exposes (a test exporter can then serve several fake instances).
- `running_prometheus(tmp_path, jobs=(), *, scrape_configs=(), scrape_interval="1s",
  evaluation_interval="1s", rule_files=(), history=None, extra_args=(),
  ready_timeout=30.0, retention="1d", max_block_duration=None)`: a context manager yielding `RunningPrometheus`. `scrape_configs`
  takes raw dicts for anything ScrapeJob cannot say; `rule_files` are copied into the
  config; `history` is OpenMetrics text (samples with timestamps in the past, labels
  including `job`/`instance`, ending `# EOF`) backfilled with `promtool tsdb
  create-blocks-from openmetrics` before start, so tests can query minutes of history
  without waiting for it (pass a `retention` longer than the history, e.g. "60d", or
  Prometheus deletes the older blocks at start; for days of history a
  `max_block_duration` such as "400h" makes one block instead of one per 2 h, ~40x faster). The process binds a free 127.0.0.1 port, is waited on until
  `/-/ready`, and is always stopped afterwards (TERM, wait, KILL).
- `RunningPrometheus`: `.url`, `.port`, `.config_path`, `.data_dir`, `.log()`,
  `.query(expr)`, `.wait_for(expr, predicate, timeout)`, `.wait_for_targets_up(timeout)`,
  `.reload()` (POST /-/reload), `.stop()`.

A missing `prometheus`/`promtool` binary raises (tests fail, they do not skip):
`make test` installs the package via `scripts/install-sysdeps.sh`.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from qpq_server.devserver import free_port

__all__ = ["RunningPrometheus", "ScrapeJob", "running_prometheus"]


@dataclass(frozen=True)
class ScrapeJob:
    job: str
    targets: Sequence[str]
    honor_labels: bool = False
    instance: str | None = None
    metrics_path: str = "/metrics"

    def config(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "job_name": self.job,
            "metrics_path": self.metrics_path,
            "honor_labels": self.honor_labels,
            "static_configs": [{"targets": list(self.targets)}],
        }
        if self.instance is not None:
            entry["relabel_configs"] = [
                {"target_label": "instance", "replacement": self.instance}
            ]
        return entry


@dataclass
class RunningPrometheus:
    url: str
    port: int
    config_path: Path
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    _client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=10.0))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = self._client.get(f"{self.url}/api/v1/query", params={"query": expr})
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()["data"]["result"]
        return result

    def wait_for(self, expr: str,
                 predicate: Callable[[list[dict[str, Any]]], bool] = bool,
                 timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll `expr` until `predicate(result)` holds; raise TimeoutError with the log."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if predicate(result):
                return result
            time.sleep(0.2)
        raise TimeoutError(f"{expr!r} never satisfied; last {result!r}\n{self.log()[-3000:]}")

    def wait_for_targets_up(self, timeout: float = 30.0) -> None:
        """Wait until every configured target has been scraped successfully once."""
        deadline = time.monotonic() + timeout
        targets: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            data = self._client.get(f"{self.url}/api/v1/targets").json()["data"]
            targets = data["activeTargets"]
            if targets and all(t["health"] == "up" for t in targets):
                return
            time.sleep(0.2)
        raise TimeoutError(f"targets not up: {targets!r}")

    def reload(self) -> None:
        self._client.post(f"{self.url}/-/reload").raise_for_status()

    def stop(self, timeout: float = 15.0) -> None:
        self._client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found: install the Debian prometheus package "
                           "(scripts/install-sysdeps.sh)")
    return path


def _backfill(history: str, workdir: Path, data_dir: Path, block: str | None) -> None:
    source = workdir / "history.om"
    source.write_text(history if history.rstrip().endswith("# EOF") else history + "# EOF\n")
    out = subprocess.run(
        [_binary("promtool"), "tsdb", "create-blocks-from", "openmetrics",
         *([f"--max-block-duration={block}"] if block else []), str(source), str(data_dir)],
        capture_output=True, text=True, timeout=120,
    )
    if out.returncode != 0:
        raise RuntimeError(f"promtool backfill failed:\n{out.stdout}\n{out.stderr}")


@contextmanager
def running_prometheus(
    tmp_path: Path,
    jobs: Sequence[ScrapeJob] = (),
    *,
    scrape_configs: Sequence[dict[str, Any]] = (),
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    rule_files: Sequence[Path] = (),
    history: str | None = None,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 30.0,
    retention: str = "1d",
    max_block_duration: str | None = None,
) -> Iterator[RunningPrometheus]:
    """Start Prometheus on a free loopback port; stop it when the block ends."""
    workdir = tmp_path / f"prometheus-{free_port()}"
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True)
    rules = []
    for rule_file in rule_files:
        copy = workdir / Path(rule_file).name
        shutil.copy(rule_file, copy)
        rules.append(str(copy))
    config = {
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                   "evaluation_interval": evaluation_interval},
        "rule_files": rules,
        "scrape_configs": [j.config() for j in jobs] + list(scrape_configs),
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    if history is not None:
        _backfill(history, workdir, data_dir, max_block_duration)

    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [_binary("prometheus"), f"--config.file={config_path}",
             f"--storage.tsdb.path={data_dir}", f"--web.listen-address=127.0.0.1:{port}",
             "--web.enable-lifecycle", f"--storage.tsdb.retention.time={retention}",
             *extra_args],
            stdout=log, stderr=subprocess.STDOUT,
        )
    prom = RunningPrometheus(f"http://127.0.0.1:{port}", port, config_path, data_dir,
                             process, log_path)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited {process.returncode}:\n{prom.log()}")
            try:
                if httpx.get(f"{prom.url}/-/ready", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready in {ready_timeout}s:\n{prom.log()}")
            time.sleep(0.1)
        yield prom
    finally:
        prom.stop()
