"""One wheelhouse per test run, shared by every xdist worker and the systemd-host tests.

Building it (`pip wheel` of qpq[fast] and all its dependencies) costs ~27 s, so a run builds
it once. It lives under /var/tmp, not pytest's base temp dir: other pytest runs on the machine
prune old base temp dirs, and the systemd host binds it read-only while it runs. The process
that starts the run (pytest alone, or xdist's controller) names a directory for the run in
QPQ_TEST_WHEELHOUSE, which its workers inherit, and deletes it when the run ends, after every
worker has finished; the first process that needs the wheels builds them under a lock.
Directories left by runs that were killed are pruned after a day. A QPQ_TEST_WHEELHOUSE set
before pytest starts is used and kept: built there once, then reused as built, even after the
code changes.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

ENV = "QPQ_TEST_WHEELHOUSE"
BASE = Path("/var/tmp")
PREFIX = "qpq-test-wheelhouse-"
STALE_AFTER_S = 24 * 3600
_COMPLETE = ".complete"  # written last: a build that died half-way is started again

_owned: Path | None = None  # the directory this process named, and so deletes


def configure(config: pytest.Config) -> None:
    """Name this run's wheelhouse (not built yet); a worker inherits its controller's."""
    global _owned
    if hasattr(config, "workerinput") or os.environ.get(ENV):
        return
    _prune_stale()
    _owned = BASE / f"{PREFIX}{uuid.uuid4().hex}"
    os.environ[ENV] = str(_owned)


def unconfigure(config: pytest.Config) -> None:
    global _owned
    if _owned is not None:
        shutil.rmtree(_owned, ignore_errors=True)
        if os.environ.get(ENV) == str(_owned):
            del os.environ[ENV]
        _owned = None


def shared_wheel() -> Path:
    """The qpq wheel in this run's wheelhouse, beside its dependencies' (an offline index)."""
    from tests.ansible.runner import build_wheelhouse  # heavy imports: only when needed

    home = Path(os.environ[ENV])
    # World-readable: the systemd host's non-root deployer installs from it too.
    home.mkdir(mode=0o755, parents=True, exist_ok=True)
    with (home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait, then reuse it
        if (home / _COMPLETE).exists():
            (wheel,) = (home / "wheels").glob("qpq-*.whl")
            return wheel
        for partial in ("src", "wheels"):
            shutil.rmtree(home / partial, ignore_errors=True)
        wheel = build_wheelhouse(home)
        wheel.parent.chmod(0o755)
        for built in wheel.parent.iterdir():
            built.chmod(0o644)
        (home / _COMPLETE).touch()
        return wheel


def _prune_stale() -> None:
    cutoff = time.time() - STALE_AFTER_S
    for old in BASE.glob(f"{PREFIX}*"):
        try:
            if old.is_dir() and old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue
