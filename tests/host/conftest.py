"""Fixtures for the real-systemd-host tests: a booted Debian 12 host.

The wheelhouse it installs from is the run's shared one (`qpq_wheel`, tests/conftest.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ansible.runner import REPO
from tests.host.systemd_host import SystemdHost, systemd_host


@pytest.fixture(scope="module")
def host(qpq_wheel: Path) -> Iterator[SystemdHost]:
    """A fresh Debian 12 host with systemd as PID 1, powered off and deleted afterwards.

    ansible-playbook runs INSIDE it (connection local), from this checkout and its venv, so
    this checkout, the venv's base interpreter and the wheelhouse are bound in read-only at
    the same paths.
    """
    binds = [REPO, Path(sys.base_prefix), qpq_wheel.parent]
    with systemd_host(binds) as booted:
        yield booted
