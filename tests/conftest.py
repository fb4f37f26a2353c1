"""Suite-wide plugins: the secrets canary (tests/helpers/canary.py)."""

from tests.helpers.canary import (  # noqa: F401  (hooks and fixture pytest picks up here)
    pytest_configure,
    pytest_runtest_makereport,
    pytest_unconfigure,
    secrets_canary,
)
