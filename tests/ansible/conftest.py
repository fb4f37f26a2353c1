"""Session fixtures for the playbook tests (their wheelhouse, `qpq_wheel`, is tests/conftest.py's)."""

from __future__ import annotations

import pytest

from qpq_ops.capacity import SYSCTL


@pytest.fixture(scope="session")
def sysctl_settings() -> dict[str, int]:
    """The kernel values `qpq-ops tune sysctl` wants (the roles hold none of their own)."""
    return dict(SYSCTL)
