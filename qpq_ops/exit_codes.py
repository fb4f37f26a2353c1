"""Exit codes of every `qpq-ops` command (fixed by DESIGN.md)."""

from enum import IntEnum

__all__ = ["ExitCode"]


class ExitCode(IntEnum):
    OK = 0
    WARNING = 1
    CRITICAL = 2
    CANNOT_EVALUATE = 3
    USAGE = 64
