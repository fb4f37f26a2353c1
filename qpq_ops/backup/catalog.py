"""`backup list` and `backup prune`: the archives in a directory, and which to keep."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from qpq_ops.backup.archive import read_manifest
from qpq_ops.backup.manifest import Manifest, parse_archive_name
from qpq_ops.errors import OpsError

__all__ = ["ArchiveInfo", "PrunePlan", "apply_prune", "list_archives", "plan_prune"]


@dataclass(frozen=True)
class ArchiveInfo:
    path: Path
    created: dt.datetime
    size_bytes: int
    manifest: Manifest | None  # None: unreadable (truncated/damaged), shown as such
    problem: str = ""


def list_archives(directory: Path) -> list[ArchiveInfo]:
    """Our archives in `directory` (by name), newest first; temp files are ignored."""
    if not directory.is_dir():
        raise OpsError(f"not a directory: {directory}")
    infos = []
    for path in directory.iterdir():
        created = parse_archive_name(path.name)
        if created is None or not path.is_file():
            continue
        try:
            manifest, problem = read_manifest(path), ""
        except OpsError as exc:
            manifest, problem = None, str(exc)
        infos.append(ArchiveInfo(path, created, path.stat().st_size, manifest, problem))
    return sorted(infos, key=lambda i: (i.created, i.path.name), reverse=True)


@dataclass(frozen=True)
class PrunePlan:
    keep: tuple[ArchiveInfo, ...]
    delete: tuple[ArchiveInfo, ...]


def plan_prune(archives: list[ArchiveInfo], keep_last: int, keep_daily: int) -> PrunePlan:
    """Keep the `keep_last` newest, plus the newest of each of the `keep_daily` most
    recent UTC days that have a backup. Everything else is deleted. Pure."""
    if keep_last < 0 or keep_daily < 0:
        raise ValueError("keep counts must be >= 0")
    newest_first = sorted(archives, key=lambda i: (i.created, i.path.name), reverse=True)
    keep = set(range(min(keep_last, len(newest_first))))
    days_seen: list[dt.date] = []
    for index, info in enumerate(newest_first):
        day = info.created.date()
        if day in days_seen:
            continue
        if len(days_seen) >= keep_daily:
            break
        days_seen.append(day)
        keep.add(index)
    return PrunePlan(
        keep=tuple(a for i, a in enumerate(newest_first) if i in keep),
        delete=tuple(a for i, a in enumerate(newest_first) if i not in keep),
    )


def apply_prune(plan: PrunePlan) -> None:
    for info in plan.delete:
        info.path.unlink(missing_ok=True)
