"""Fixtures of the bundle tests: the repo root, the generated files, real exporters."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from qpq_server.devserver import NodeExporter, running_node_exporter

REPO = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    """Path of a required command-line tool; a missing tool fails (never skips)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run scripts/install-sysdeps.sh (make sysdeps)")
    return path


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="module")
def node_exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeExporter]:
    base = tmp_path_factory.mktemp("node-exporter")
    textfile_dir = base / "textfile"
    textfile_dir.mkdir()
    with running_node_exporter(textfile_dir=textfile_dir,
                               log_path=base / "node-exporter.log") as exporter:
        yield exporter
