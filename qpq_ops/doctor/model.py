"""What a doctor check returns, and how the results combine into one exit code."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from qpq_ops.exit_codes import ExitCode, severity

__all__ = ["CheckResult", "CheckState", "exit_code_for", "worst"]


class CheckState(StrEnum):
    OK = "ok"
    WARNING = "warning"
    CRITICAL = "critical"
    NO_DATA = "no-data"
    SKIPPED = "skipped"
    """not asked for (e.g. no --prometheus-url) or the host cannot tell; never fails"""


@dataclass(frozen=True)
class CheckResult:
    id: str
    title: str
    state: CheckState
    detail: str
    """what was found, one line"""
    fix: str = ""
    """what to do about it (empty when ok)"""
    value: float | None = None
    """the measured figure when there is one (days, seconds, bytes, percent)"""

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "title": self.title, "state": str(self.state),
                "detail": self.detail, "fix": self.fix, "value": self.value}


_EXIT = {CheckState.OK: ExitCode.OK, CheckState.SKIPPED: ExitCode.OK,
         CheckState.WARNING: ExitCode.WARNING, CheckState.CRITICAL: ExitCode.CRITICAL,
         CheckState.NO_DATA: ExitCode.CANNOT_EVALUATE}


def exit_code_for(state: CheckState) -> ExitCode:
    """DESIGN.md: 2 critical, else 1 warning, else 3 no-data, else 0 (skipped never fails)."""
    return _EXIT[state]


def worst(results: list[CheckResult]) -> CheckState:
    """The worst state by `qpq_ops.exit_codes.severity`; "skipped" only when every check
    was skipped, "ok" when there are none."""
    states = [r.state for r in results]
    ran = [s for s in states if s is not CheckState.SKIPPED] or states
    return max(ran, key=lambda s: severity(exit_code_for(s)), default=CheckState.OK)
