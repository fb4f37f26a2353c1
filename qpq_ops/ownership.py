"""Keep files the server must read owned by the server's user.

Operators often run `qpq-ops` as root while qpq-server runs as its own user. A file
written by root (a rotated `.env`, a new certificate, an OPAQUE setup, a restored
database) would then be 0600 root-owned and unreadable to the server at its next reload
or start. So, when running as root, everything written into a deployment is given to the
owner of what it replaces (or of the data dir).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["Owner", "give_to", "owner_of"]

Owner = tuple[int, int]


def owner_of(path: Path) -> Owner | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_uid, st.st_gid


def give_to(paths: Iterable[Path], owner: Owner | None) -> None:
    """chown each path (directories recursively) to `owner`; only as root, else a no-op."""
    if owner is None or os.geteuid() != 0:
        return
    uid, gid = owner
    for path in paths:
        if not path.exists():
            continue
        tree = [path, *path.rglob("*")] if path.is_dir() else [path]
        for item in tree:
            os.chown(item, uid, gid, follow_symlinks=False)
