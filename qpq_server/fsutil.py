"""Durable file writes shared by the server, the client and qpq-ops.

`write_atomic` is the one way we replace a file: a uniquely named temp file in the same
directory (created with its final mode, so a secret is never briefly world-readable),
fsync, rename over the target, then fsync the directory so the rename itself survives
a power loss. Readers see the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["fsync_dir", "write_atomic"]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o600,
                 sync_dir: bool = True) -> None:
    payload = data.encode() if isinstance(data, str) else data
    # The ".tmp" suffix keeps the temp name out of globs such as node_exporter's *.prom.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
