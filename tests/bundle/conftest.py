"""Fixtures of the bundle tests: the repo root, the generated files, real exporters."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers.ports import free_port

REPO = Path(__file__).resolve().parents[2]
NODE_EXPORTER = Path("/usr/bin/prometheus-node-exporter")


def tool(name: str) -> str:
    """Path of a required command-line tool; a missing tool fails (never skips)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run scripts/install-sysdeps.sh (make sysdeps)")
    return path


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@dataclass
class NodeExporter:
    url: str
    textfile_dir: Path
    process: subprocess.Popen[bytes]


def start_node_exporter(textfile_dir: Path, log: Path, timeout: float = 15.0) -> NodeExporter:
    """Debian's node_exporter on a free loopback port, reading textfile_dir."""
    if not NODE_EXPORTER.exists():
        pytest.fail(f"{NODE_EXPORTER} missing: run scripts/install-sysdeps.sh")
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(NODE_EXPORTER), f"--web.listen-address=127.0.0.1:{port}",
             f"--collector.textfile.directory={textfile_dir}"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    exporter = NodeExporter(f"http://127.0.0.1:{port}", textfile_dir, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"node_exporter exited {process.returncode}: {log.read_text()}")
        try:
            if httpx.get(exporter.url + "/metrics", timeout=2.0).status_code == 200:
                return exporter
        except httpx.HTTPError:
            time.sleep(0.1)
    stop(process)
    raise RuntimeError(f"node_exporter not ready in {timeout}s: {log.read_text()}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="module")
def node_exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeExporter]:
    base = tmp_path_factory.mktemp("node-exporter")
    textfile_dir = base / "textfile"
    textfile_dir.mkdir()
    exporter = start_node_exporter(textfile_dir, base / "node-exporter.log")
    try:
        yield exporter
    finally:
        stop(exporter.process)
