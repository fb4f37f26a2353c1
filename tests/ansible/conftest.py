"""Session fixtures for the playbook tests: one wheelhouse per test worker."""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from qpq_ops.capacity import SYSCTL
from tests.ansible.runner import build_wheelhouse


@pytest.fixture(scope="session")
def qpq_wheel(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The qpq wheel, beside the wheels of all its dependencies (an offline index).

    Built once per test run: xdist workers share it through their common base temp dir.
    """
    if worker_id == "master":
        return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))
    shared = tmp_path_factory.getbasetemp().parent / "ansible-wheelhouse"
    shared.mkdir(exist_ok=True)
    with (shared / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        wheels = sorted((shared / "wheels").glob("qpq-*.whl"))
        return wheels[0] if wheels else build_wheelhouse(shared)


@pytest.fixture(scope="session")
def sysctl_settings() -> dict[str, int]:
    """The kernel values `qpq-ops tune sysctl` wants (the roles hold none of their own)."""
    return dict(SYSCTL)
