"""Exit codes of every `qpq-ops` command (fixed by DESIGN.md), and the one rule that
combines many findings into one: the worst wins, critical (2) > warning (1) > could not
evaluate (3) > ok (0). check-triggers, doctor and tune map their own states to these
codes and combine them here.
"""

from collections.abc import Iterable
from enum import IntEnum

__all__ = ["ExitCode", "severity", "worst"]


class ExitCode(IntEnum):
    OK = 0
    WARNING = 1
    CRITICAL = 2
    CANNOT_EVALUATE = 3
    USAGE = 64


_SEVERITY = {ExitCode.OK: 0, ExitCode.CANNOT_EVALUATE: 1, ExitCode.WARNING: 2,
             ExitCode.CRITICAL: 3}


def severity(code: ExitCode) -> int:
    """How bad a finding's code is: 2 > 1 > 3 > 0 (USAGE is not a finding: KeyError)."""
    return _SEVERITY[code]


def worst(codes: Iterable[ExitCode]) -> ExitCode:
    """The code of the worst finding; OK when there is none."""
    return max(codes, key=severity, default=ExitCode.OK)
