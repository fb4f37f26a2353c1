"""Results of evaluating the scaling triggers, shared by both evaluators and the CLI."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qpq_ops.exit_codes import ExitCode
from qpq_ops.triggers import State, Trigger, worst_state

__all__ = ["Evaluation", "TriggerResult", "exit_code_for"]


@dataclass(frozen=True)
class TriggerResult:
    """One trigger on one instance."""

    trigger: Trigger
    instance: str | None
    """the `instance` label (Prometheus) or host:port scraped (direct); None = no series"""
    state: State
    value: float | None
    """the value compared with the thresholds (for sustained triggers: the least bad
    value over the window)"""
    current: float | None = None
    """for sustained triggers, the latest value"""
    note: str = ""

    def to_json(self) -> dict[str, object]:
        t = self.trigger
        return {
            "id": t.id,
            "instance": self.instance,
            "state": str(self.state),
            "value": _finite(self.value),
            "unit": t.unit,
            "warning": t.warning,
            "critical": t.critical,
            "action": t.action,
            "sustain_s": t.sustain_s,
            "current": _finite(self.current),
            "note": self.note,
            "runbook": t.runbook,
        }


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class Evaluation:
    """Every trigger result of one pass, from one source."""

    source: str
    """"prometheus" or "direct\""""
    url: str
    evaluated_at: float
    results: tuple[TriggerResult, ...]
    skipped: tuple[str, ...] = ()
    """ids of triggers this source cannot answer at all (said once, in `skipped_note`)"""
    skipped_note: str = ""

    @property
    def status(self) -> State:
        return worst_state([r.state for r in self.results])

    @property
    def exit_code(self) -> ExitCode:
        return exit_code_for(self.status)

    def to_json(self) -> dict[str, object]:
        return {
            "status": str(self.status),
            "source": self.source,
            "url": self.url,
            "evaluated_at": self.evaluated_at,
            "triggers": [r.to_json() for r in self.results],
            "skipped": {"ids": list(self.skipped), "reason": self.skipped_note},
        }


def exit_code_for(status: State) -> ExitCode:
    """DESIGN.md: 2 critical, else 1 warning, else 3 no-data, else 0."""
    return status.exit_code
