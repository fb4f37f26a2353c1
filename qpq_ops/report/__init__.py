"""`qpq-ops report`: one self-contained HTML page about a deployment's capacity.

`build_report(ReportInputs) -> str` reads the forecast (`qpq_ops.forecast`), the alerts
that fired and, when a config is given, the doctor's findings, draws the charts
(`charts`) and fills `templates/report.html.j2`. The page needs no network: charts are
inline SVG, styles inline, no script.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import jinja2

from qpq_ops.calibration import REFERENCE, Calibration
from qpq_ops.display import format_value, signed_value
from qpq_ops.doctor import CheckResult, DoctorInputs, run_doctor
from qpq_ops.forecast import ForecastResult, format_duration, run_forecast
from qpq_ops.forecast.history import fetch_ranges, instance_matcher
from qpq_ops.forecast.trend import iso_date
from qpq_ops.report.alerts import FiredAlert, alerts_expr, fired_alerts
from qpq_ops.report.charts import rate_chart, storage_chart, trigger_chart
from qpq_ops.triggers import Severity

__all__ = ["Report", "ReportInputs", "build_report"]


@dataclass(frozen=True)
class ReportInputs:
    prometheus_url: str
    lookback_s: int
    horizon_s: int
    instances: Sequence[str] = ()
    doctor: DoctorInputs | None = None
    timeout: float = 30.0
    now: float | None = None
    progress: Callable[[str], None] = field(default=lambda _step: None)
    calibration: Calibration | None = REFERENCE
    """qpq's measured costs for the capacity plan (None: the guide's worksheet)."""


@dataclass(frozen=True)
class Report:
    html: str
    status: str
    """the forecast's worst state"""
    instances: list[str]
    charts: int
    threshold_lines: int
    """two per trigger chart (warning and critical)"""


@dataclass(frozen=True)
class _Chart:
    id: str
    svg: str
    thresholds: bool
    """drawn with the warning and critical lines"""


@dataclass(frozen=True)
class _Section:
    name: str
    rows: list[dict[str, object]]
    charts: list[_Chart]
    missing: list[str]






def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("qpq_ops.report", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["value"] = format_value
    env.filters["signed"] = signed_value
    env.filters["when"] = _when
    env.filters["date"] = iso_date
    env.filters["duration"] = format_duration
    return env


def _instances(result: ForecastResult) -> list[_Section]:
    sections = []
    for n, instance in enumerate(result.instances):
        rows: list[dict[str, object]] = []
        charts: list[_Chart] = []
        missing: list[str] = []
        for f in (f for f in result.forecasts if f.instance == instance):
            rows.append({
                "title": f.trigger.title, "unit": f.trigger.unit, "state": str(f.state),
                "current": f.series.last, "confidence": str(f.confidence),
                "notes": list(f.notes),
                "slope": None if f.fit is None else f.fit.slope_per_day,
                "warning": f.crossing(Severity.WARNING).describe(result.horizon_s),
                "critical": f.crossing(Severity.CRITICAL).describe(result.horizon_s),
                "thresholds": (f.trigger.warning, f.trigger.critical),
            })
            if f.series:
                chart_id = f"i{n}-{f.trigger.id}"
                charts.append(_Chart(chart_id, trigger_chart(f, chart_id), thresholds=True))
            else:
                missing.append(f"{f.trigger.title}: {f.notes[0]}")
        rate = result.message_rate.get(instance)
        if rate:
            chart_id = f"i{n}-message-rate"
            svg = rate_chart(rate, instance, chart_id, result.now + result.horizon_s)
            charts.append(_Chart(chart_id, svg, thresholds=False))
        stored = next((g for g in result.storage if g.instance == instance), None)
        if stored is not None and stored.series:
            chart_id = f"i{n}-blob-storage"
            svg = storage_chart(stored.series, stored.bytes_per_day, instance, chart_id,
                                result.now, result.now + result.horizon_s)
            charts.append(_Chart(chart_id, svg, thresholds=False))
        sections.append(_Section(instance or "(no instance label)", rows, charts, missing))
    return sections


def build_report(inputs: ReportInputs) -> Report:
    """The report's HTML. Raises `SourceError` when Prometheus cannot be read."""
    now = time.time() if inputs.now is None else inputs.now
    inputs.progress("reading history from Prometheus")
    result = run_forecast(inputs.prometheus_url, lookback_s=inputs.lookback_s,
                          horizon_s=inputs.horizon_s, instances=inputs.instances,
                          timeout=inputs.timeout, now=now, calibration=inputs.calibration)
    expr = alerts_expr(instance_matcher(inputs.instances), result.step_s)
    ranges = fetch_ranges(inputs.prometheus_url, {"alerts": expr}, start=now - inputs.lookback_s,
                          end=now, step_s=result.step_s, timeout=inputs.timeout)
    alerts: list[FiredAlert] = fired_alerts(ranges["alerts"], result.step_s)
    findings: list[CheckResult] | None = None
    if inputs.doctor is not None:
        inputs.progress("running doctor")
        findings = run_doctor(inputs.doctor)
    inputs.progress("drawing charts")
    sections = _instances(result)
    outlook = result.outlook
    plan_rows = [] if outlook is None else [
        ("now (observed peak)", outlook.now),
        *((f"from {iso_date(c.at)}", c) for c in outlook.changes),
        (f"horizon {iso_date(outlook.horizon.at)}", outlook.horizon),
    ]
    page = _environment().get_template("report.html.j2").render(
        result=result, sections=sections, alerts=alerts, findings=findings,
        outlook=outlook, plan_rows=plan_rows, generated=now,
    )
    charts = [c for section in sections for c in section.charts]
    lines = 2 * sum(1 for c in charts if c.thresholds)
    return Report(page, str(result.status), result.instances, len(charts), lines)
