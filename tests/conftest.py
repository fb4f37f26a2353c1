"""Suite-wide plugins: the secrets canary (tests/helpers/canary.py), longest files first
(tests/helpers/ordering.py)."""

from tests.helpers.canary import (  # noqa: F401  (hooks and fixture pytest picks up here)
    pytest_configure,
    pytest_runtest_makereport,
    pytest_unconfigure,
    secrets_canary,
)
from tests.helpers.ordering import pytest_collection_modifyitems  # noqa: F401
