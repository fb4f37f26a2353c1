"""The restore's journal: every change to the data dir is written down before it is made.

Placing a restore renames several things in turn (the database and its WAL/shm, the
blob, OPAQUE and KT trees, secrets), so a kill between two renames would leave a mix of
old and new, or the old database without its WAL. Before each change the journal
(`DATA_DIR/.qpq-restore-journal`, JSON lines, fsynced) records what is about to move
where; once every rename is done it is deleted. While it exists the server refuses to
start, and the next `qpq-ops restore` (or `--resume`) first rolls the interrupted one
back: each recorded change undone in reverse order, decided from what is on disk (so a
rollback killed half-way is simply run again), until the old data is in place whole.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpq_server.fsutil import fsync_dir
from qpq_server.storage.base import RESTORE_JOURNAL

__all__ = ["PlaceJournal", "Rollback", "roll_back"]

_DB_SIDECARS = ("-wal", "-shm")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@dataclass(frozen=True)
class Rollback:
    """What rolling back an interrupted restore found and did."""

    started: str          # when the interrupted restore began placing
    undone: int           # recorded changes that had been made and were undone

    def describe(self) -> str:
        return (f"a restore interrupted at {self.started} was rolled back first "
                f"({self.undone} changes undone): the old data was back in place whole "
                "before this run")


class PlaceJournal:
    """Append-only record of the changes one restore makes to the data dir."""

    def __init__(self, data_dir: Path, aside: Path) -> None:
        self.path = data_dir / RESTORE_JOURNAL
        self._write({"started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                     "aside": str(aside)}, mode="w")
        fsync_dir(data_dir)

    def _write(self, record: dict[str, Any], mode: str = "a") -> None:
        with self.path.open(mode, encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def moving(self, live: Path, aside: Path) -> None:
        """`live` (a file or tree, or nothing) goes to `aside`; new content follows."""
        self._write({"kind": "move", "live": str(live), "aside": str(aside),
                     "existed": live.exists() or live.is_symlink()})

    def database(self, live: Path, aside: Path) -> None:
        """The SQLite database `live`: linked (or copied) to `aside`, its WAL and shm
        moved beside it, then the new file renamed over `live`."""
        inode = [live.stat().st_dev, live.stat().st_ino] if live.exists() else None
        self._write({"kind": "database", "live": str(live), "aside": str(aside),
                     "inode": inode})

    def finish(self) -> None:
        self.path.unlink()
        fsync_dir(self.path.parent)


def _undo_move(rec: dict[str, Any]) -> bool:
    live, aside = Path(rec["live"]), Path(rec["aside"])
    if not rec["existed"]:
        if live.exists() or live.is_symlink():
            _remove(live)  # something new placed where there was nothing
            return True
        return False
    if not (aside.exists() or aside.is_symlink()):
        return False  # never moved: `live` is still the old one
    if live.is_dir() and not live.is_symlink():
        shutil.rmtree(live)  # the new tree (the archive still has it)
    os.replace(aside, live)
    return True


def _undo_database(rec: dict[str, Any]) -> bool:
    """The old file back first, then its WAL: never the old WAL beside the new file."""
    live, aside = Path(rec["live"]), Path(rec["aside"])
    changed = False
    if rec["inode"] is None:
        if live.exists():
            live.unlink()  # the new database, where there was none
            changed = True
    elif aside.exists():
        st = live.stat() if live.exists() else None
        if st is not None and [st.st_dev, st.st_ino] == rec["inode"]:
            aside.unlink()  # never swapped: the aside link/copy is redundant
        else:
            os.replace(aside, live)
        changed = True
    for suffix in _DB_SIDECARS:
        moved, home = Path(f"{aside}{suffix}"), Path(f"{live}{suffix}")
        if moved.exists():
            os.replace(moved, home)
            changed = True
        elif rec["inode"] is None and home.exists():
            home.unlink()
    return changed


def _prune_empty(root: Path) -> None:
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if not any(root.iterdir()):
        root.rmdir()


def roll_back(data_dir: Path) -> Rollback | None:
    """Undo an interrupted restore recorded in `data_dir`'s journal, if there is one."""
    path = data_dir / RESTORE_JOURNAL
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    # A kill while a record was being appended leaves a torn last line: that change
    # had not started (each record is written and fsynced before its change).
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    header = records[0] if records else {}
    undone = 0
    for rec in reversed(records[1:]):
        undo = _undo_database if rec.get("kind") == "database" else _undo_move
        undone += undo(rec)
    if header.get("aside"):
        _prune_empty(Path(header["aside"]))
    path.unlink()
    fsync_dir(data_dir)
    return Rollback(str(header.get("started", "an unknown time")), undone)
