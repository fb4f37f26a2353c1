"""What a doctor check returns, and how the results combine into one exit code."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from qpq_ops.exit_codes import ExitCode

__all__ = ["CheckResult", "CheckState", "exit_code_for", "worst"]


class CheckState(StrEnum):
    OK = "ok"
    WARNING = "warning"
    CRITICAL = "critical"
    NO_DATA = "no-data"
    SKIPPED = "skipped"
    """not asked for (e.g. no --prometheus-url) or the host cannot tell; never fails"""


_RANK = {CheckState.SKIPPED: 0, CheckState.OK: 1, CheckState.NO_DATA: 2,
         CheckState.WARNING: 3, CheckState.CRITICAL: 4}


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


def worst(results: list[CheckResult]) -> CheckState:
    return max((r.state for r in results), key=lambda s: _RANK[s], default=CheckState.OK)


def exit_code_for(state: CheckState) -> ExitCode:
    """DESIGN.md: 2 critical, else 1 warning, else 3 no-data, else 0."""
    return {
        CheckState.CRITICAL: ExitCode.CRITICAL,
        CheckState.WARNING: ExitCode.WARNING,
        CheckState.NO_DATA: ExitCode.CANNOT_EVALUATE,
    }.get(state, ExitCode.OK)
