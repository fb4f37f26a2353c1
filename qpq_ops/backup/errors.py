"""Errors of backup, restore and rotation, each carrying the exit code it maps to.

    OpsError                  (3: could not complete)
    ├── ArchiveDamaged        (2: the archive or the data is damaged: checksum, truncation,
    │                             missing member, failed integrity check)
    ├── Refused               (64: a safety rule or bad usage: running server, non-empty
    │                             data dir, other schema version without --force, bad option)
    └── WrongKey              (3: the given key does not open the database)

The CLI prints `str(error)` as one line on stderr and exits with `error.exit_code`.
"""

from __future__ import annotations

from qpq_ops.exit_codes import ExitCode

__all__ = ["ArchiveDamaged", "OpsError", "Refused", "WrongKey"]


class OpsError(Exception):
    exit_code: ExitCode = ExitCode.CANNOT_EVALUATE


class ArchiveDamaged(OpsError):
    exit_code = ExitCode.CRITICAL


class Refused(OpsError):
    exit_code = ExitCode.USAGE


class WrongKey(OpsError):
    exit_code = ExitCode.CANNOT_EVALUATE
