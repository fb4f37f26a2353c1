"""Longest files first: with `--dist loadfile` a worker takes one whole file at a time, so
a long file started last keeps one core busy after the others have run out of work.
xdist would reorder the files by their number of tests unless told not to: `make pytest`
passes `--no-loadscope-reorder` (tests/test_suite_ordering.py holds it to that).

The list is the slowest files of a measured run (`--durations`, per file); a file not
listed keeps its place after them. A stale list only costs time, never a test.
"""

from __future__ import annotations

import pytest

LONGEST_FIRST = (
    "tests/ansible/test_deploy.py",
    # The first three start together (`make test` runs three workers). The systemd host
    # boots its guest while the first file builds the wheelhouse it then installs from
    # (tests/helpers/wheelhouse.py); the third needs no wheel and keeps a core busy.
    "tests/host/test_deploy_systemd.py",
    "tests/server/test_client_delivery.py",
    "tests/ansible/test_postgres_role.py",
    "tests/ansible/test_shared_tls.py",
    "tests/ansible/test_day2.py",
    "tests/federation/test_relay.py",
    "tests/ansible/test_preflight.py",
    "tests/ansible/test_hashed_install.py",
    "tests/ansible/test_fast_extra.py",
    "tests/ansible/test_multi_host.py",
    "tests/ansible/test_federation.py",
    "tests/ansible/test_static.py",
    "tests/server/test_blobs.py",
    "tests/bundle/test_prometheus_rules.py",
    "tests/server/test_lifecycle.py",
    "tests/server/test_postgres_nodes.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}

    def key(item: pytest.Item) -> int:
        return rank.get(item.nodeid.split("::", 1)[0], len(rank))

    items.sort(key=key)  # stable: the rest keep collection order
