"""Fixtures for the real-systemd-host tests: the qpq wheelhouse and a booted Debian 12 host."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ansible.runner import REPO, build_wheelhouse
from tests.host.systemd_host import SystemdHost, systemd_host


@pytest.fixture(scope="module")
def wheel() -> Iterator[Path]:
    """The qpq wheel built from this checkout, beside its dependencies (an offline index).

    Outside pytest's tmp_path (see systemd_host): the host reads it while it runs.
    """
    with tempfile.TemporaryDirectory(prefix="qpq-test-wheels-", dir="/var/tmp") as tmp:
        yield build_wheelhouse(Path(tmp))


@pytest.fixture(scope="module")
def host(wheel: Path) -> Iterator[SystemdHost]:
    """A fresh Debian 12 host with systemd as PID 1, powered off and deleted afterwards.

    ansible-playbook runs INSIDE it (connection local), from this checkout and its venv, so
    this checkout, the venv's base interpreter and the wheelhouse are bound in read-only at
    the same paths.
    """
    binds = [REPO, Path(sys.base_prefix), wheel.parent]
    with systemd_host(binds) as booted:
        yield booted
