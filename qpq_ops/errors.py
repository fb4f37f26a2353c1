"""The errors of every `qpq-ops` command, each carrying the exit code it maps to.

    OpsError                      (3: could not complete)
    ├── ArchiveDamaged            (2: the archive or the data is damaged: checksum,
    │                                 truncation, missing member, failed integrity check)
    ├── Refused                   (64: a safety rule or bad usage: running server, non-empty
    │   │                             data dir, other schema version without --force)
    │   ├── ConfigUnreadable      (64: the config file cannot be read or is not TOML)
    │   ├── ConfigInvalid         (64: qpq-server would refuse this config)
    │   ├── CapacityInputError    (64: a worksheet input is unusable; `field` names it)
    │   └── CalibrationError      (64: a calibration file cannot be used)
    ├── CalibrationRunError       (3: `capacity calibrate` could not run its server/load)
    ├── WrongKey                  (3: the given key does not open the database)
    └── SourceError               (3: a metrics source, Prometheus or a /metrics page,
        │                             cannot be reached or answers nonsense)
        └── ParseError            (3: a text is not a Prometheus exposition)

Callers catch the narrowest class they handle; the CLI prints `str(error)` as one line
on stderr and exits with `error.exit_code`. Anything else escaping a command is a bug:
`qpq_ops.cli.main` prints it as one line and exits 3.
"""

from __future__ import annotations

from qpq_ops.exit_codes import ExitCode

__all__ = [
    "ArchiveDamaged",
    "CalibrationError",
    "CalibrationRunError",
    "CapacityInputError",
    "ConfigInvalid",
    "ConfigUnreadable",
    "OpsError",
    "ParseError",
    "Refused",
    "SourceError",
    "WrongKey",
]


class OpsError(Exception):
    exit_code: ExitCode = ExitCode.CANNOT_EVALUATE


class ArchiveDamaged(OpsError):
    exit_code = ExitCode.CRITICAL


class Refused(OpsError):
    exit_code = ExitCode.USAGE


class ConfigUnreadable(Refused):
    """The config file is missing, unreadable or not TOML: nothing can be said about it."""


class ConfigInvalid(Refused):
    """The file is TOML but `qpq-server` would refuse it (bad value, missing file)."""


class CapacityInputError(Refused):
    """An input the capacity worksheet cannot use; `field` names the option."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class CalibrationError(Refused):
    """A calibration file that cannot be used; the message is one line."""


class CalibrationRunError(OpsError):
    """The throwaway server or the calibration load could not run; one line."""


class WrongKey(OpsError):
    exit_code = ExitCode.CANNOT_EVALUATE


class SourceError(OpsError):
    """The metrics source could not be read; the message is one line for the operator."""


class ParseError(SourceError):
    """The text is not a Prometheus exposition."""
