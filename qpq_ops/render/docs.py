"""The operations docs: monitoring, incident response and scaling guide.

Each document is a Jinja template (prose, `qpq_ops/render/templates/`) filled with
tables and sections built from code (`tables`, `runbooks`, the trigger definition), so
the whole file is generated and drift-tested; edit the template, not the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import jinja2

from qpq_ops import capacity
from qpq_ops.calibration import POSTGRES_REFERENCE, REFERENCE
from qpq_ops.render import tables
from qpq_ops.render._files import HEADER, RenderedFile
from qpq_ops.render.alerts import AlertRule, all_alerts
from qpq_ops.render.runbooks import RUNBOOKS, Runbook
from qpq_ops.render.units import duration_text, human_value
from qpq_ops.triggers import TRIGGERS, Severity, Trigger, get_trigger

__all__ = ["DOCS", "EXAMPLE_INPUTS", "RunbookSection", "render", "runbook_sections"]

_TEMPLATES = Path(__file__).parent / "templates"

DOCS: tuple[tuple[PurePosixPath, str], ...] = (
    (PurePosixPath("docs/operations/monitoring.md"), "monitoring.md.j2"),
    (PurePosixPath("docs/operations/incident-response.md"), "incident-response.md.j2"),
    (PurePosixPath("docs/operations/scaling-guide.md"), "scaling-guide.md.j2"),
)

EXAMPLE_INPUTS = capacity.CapacityInputs(
    users=2_000, msgs_per_user_hour=20, avg_msg_bytes=2_000, blob_uploads_per_day=200,
    avg_blob_mb=2, retention_days=14, peak_factor=1.5,
)
"""The scaling guide's worked example (its figures come from `capacity.plan`)."""


@dataclass(frozen=True)
class RunbookSection:
    runbook: Runbook
    alerts: tuple[AlertRule, ...]
    trigger: Trigger | None


def runbook_sections() -> tuple[RunbookSection, ...]:
    """One section per runbook, in alert order; each names the alerts that link it."""
    alerts = all_alerts()
    by_id = {t.id: t for t in TRIGGERS}
    return tuple(
        RunbookSection(
            runbook=rb,
            alerts=tuple(a for a in alerts if a.runbook_anchor == rb.anchor),
            trigger=by_id.get(rb.anchor),
        )
        for rb in RUNBOOKS
    )


def _gb(value: int) -> str:
    return f"{value / 1e9:,.2f} GB"


def _environment() -> jinja2.Environment:
    # Markdown, not HTML: autoescaping would mangle backticks and angle brackets.
    env = jinja2.Environment(  # noqa: S701
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        header=HEADER,
        tables=tables,
        triggers=TRIGGERS,
        disk_usage=get_trigger("disk_usage"),
        sections=runbook_sections(),
        capacity=capacity,
        example=capacity.plan(EXAMPLE_INPUTS),
        measured=capacity.plan(EXAMPLE_INPUTS, REFERENCE),
        reference=REFERENCE,
        postgres_cost=POSTGRES_REFERENCE,
        process_cpu=get_trigger("process_cpu"),
        Severity=Severity,
    )
    env.filters.update(human=lambda v, unit: human_value(unit, v), duration=duration_text,
                       gb=_gb)
    return env


def render() -> tuple[RenderedFile, ...]:
    env = _environment()
    return tuple(
        RenderedFile(path, env.get_template(name).render(source=f"qpq_ops/render/templates/{name}"))
        for path, name in DOCS
    )
