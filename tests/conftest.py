"""Suite-wide plugins: the secrets canary (tests/helpers/canary.py), longest files first
(tests/helpers/ordering.py), and the wheelhouse one run shares (tests/helpers/wheelhouse.py)."""

from pathlib import Path

import pytest

from tests.helpers import canary, wheelhouse
from tests.helpers.canary import (  # noqa: F401  (hooks and fixture pytest picks up here)
    pytest_runtest_makereport,
    secrets_canary,
)
from tests.helpers.ordering import pytest_collection_modifyitems  # noqa: F401


def pytest_configure(config: pytest.Config) -> None:
    canary.pytest_configure(config)
    wheelhouse.configure(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    wheelhouse.unconfigure(config)
    canary.pytest_unconfigure(config)


@pytest.fixture(scope="session")
def qpq_wheel() -> Path:
    """The qpq wheel, beside the wheels of all its dependencies (an offline index).

    Built once per test run, for the playbook tests and the systemd host alike.
    """
    return wheelhouse.shared_wheel()
