"""Session fixtures for the playbook tests: one wheelhouse per test worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ansible.runner import build_wheelhouse, role_defaults


@pytest.fixture(scope="session")
def qpq_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The qpq wheel, beside the wheels of all its dependencies (an offline index)."""
    return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


@pytest.fixture(scope="session")
def sysctl_settings() -> dict[str, int]:
    return dict(role_defaults("qpq_sysctl")["qpq_sysctl_settings"])
