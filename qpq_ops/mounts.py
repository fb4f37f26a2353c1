"""The mountpoint of the filesystem that holds a path (the data dir's, for disk_usage)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["mountpoint_of"]


def mountpoint_of(path: Path) -> Path:
    """The nearest ancestor of `path` (itself included) on which a filesystem is mounted:
    where the device id changes walking up, or `/`. Like `df --output=target PATH`."""
    current = path.resolve()
    while not current.exists():
        current = current.parent
    device = current.stat().st_dev
    while current != current.parent and current.parent.stat().st_dev == device \
            and not os.path.ismount(current):
        current = current.parent
    return current
