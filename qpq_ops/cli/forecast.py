"""`qpq-ops capacity forecast`: the date each scaling trigger's lines will be crossed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from qpq_ops._console import err, fail, out, print_json, styled_state
from qpq_ops.cli._calibration import CalibrationOpt, calibration_or_fail
from qpq_ops.cli.capacity import inputs_from_file
from qpq_ops.display import format_value, signed_value
from qpq_ops.errors import SourceError
from qpq_ops.evaluate.direct import http_url
from qpq_ops.exit_codes import ExitCode
from qpq_ops.forecast import (
    FORECAST_TRIGGER_IDS,
    DurationError,
    ForecastResult,
    format_duration,
    parse_duration,
    run_forecast,
)
from qpq_ops.forecast.outlook import DEFAULT_INPUTS
from qpq_ops.triggers import Severity

__all__ = ["forecast", "forecast_table", "parse_window", "prometheus_url_or_fail",
           "signed_value"]


def parse_window(option: str, text: str) -> int:
    """Seconds in a --lookback/--horizon value; exits 64 with one line when invalid."""
    try:
        return parse_duration(text)
    except DurationError as exc:
        fail(f"{option}: {exc}")


def prometheus_url_or_fail(url: str | None) -> str:
    url = url or os.environ.get("QPQ_PROMETHEUS_URL") or None
    if url is None:
        fail("--prometheus-url URL is required (or set QPQ_PROMETHEUS_URL)")
    try:
        return http_url(url)
    except SourceError as exc:
        fail(f"--prometheus-url: {exc}")




def forecast_table(result: ForecastResult) -> Table:
    table = Table(
        title=f"Capacity forecast ({result.url}, {format_duration(result.lookback_s)} of "
        f"history, horizon {format_duration(result.horizon_s)}) status: {result.status}",
        title_justify="left",
    )
    for name, justify in (("trigger", "left"), ("instance", "left"), ("now", "right"),
                          ("trend / day", "right"), ("warning line", "left"),
                          ("critical line", "left"), ("state", "left"),
                          ("confidence / notes", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for f in result.forecasts:
        t = f.trigger
        slope = "-" if f.fit is None else signed_value(f.fit.slope_per_day, t.unit)
        lines = [
            f"{format_value(c.threshold, t.unit)}: {c.describe(result.horizon_s)}"
            for c in (f.crossing(Severity.WARNING), f.crossing(Severity.CRITICAL))
        ]
        notes = "\n".join([str(f.confidence), *f.notes])
        table.add_row(t.title, f.instance or "-", format_value(f.series.last, t.unit), slope,
                      lines[0], lines[1], styled_state(f.state), notes)
    return table


def _si_bytes(n: float) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:,.2f} {prefix}B"
    return f"{n:,.0f} B"


def _print_outlook(result: ForecastResult) -> None:
    console = out()
    for g in result.storage:
        current = "-" if g.series.last is None else _si_bytes(g.series.last)
        growth = ("too little history" if g.bytes_per_day is None else
                  f"{'+' if g.bytes_per_day >= 0 else '-'}{_si_bytes(abs(g.bytes_per_day))}"
                  f"/day (~{_si_bytes(g.bytes_per_day * 30)}/month)")
        console.print(f"Blob storage on {g.instance or '-'}: {current}, {growth}",
                      highlight=False)
    outlook = result.outlook
    if outlook is None:
        console.print("Capacity plan: no qpq_connections_active in the window; nothing to "
                      "plan from.")
        return
    now = outlook.now
    console.print(
        f"Capacity plan on observed peaks: {now.users:,} concurrent users, "
        f"{now.msgs_per_hour:,.0f} messages/hour -> {now.workers} worker(s), "
        f"{now.hosts} host(s), tier {now.plan.tier}", highlight=False)
    console.print(
        f"Trend: {outlook.users_per_day:+,.1f} users/day, "
        f"{outlook.msgs_per_hour_per_day:+,.1f} messages/hour per day; at the horizon "
        f"{outlook.horizon.users:,} users -> {outlook.horizon.workers} worker(s), "
        f"{outlook.horizon.hosts} host(s)", highlight=False)
    console.print(f"[bold]{outlook.summary()}[/]", highlight=False)
    for note in outlook.notes:
        console.print(f"[dim]{note}[/]")


def forecast(
    prometheus_url: Annotated[str | None, typer.Option(
        "--prometheus-url", metavar="URL",
        help="Prometheus holding the deployment's history (default: $QPQ_PROMETHEUS_URL).",
    )] = None,
    lookback: Annotated[str, typer.Option(
        "--lookback", metavar="DURATION",
        help="History to fit the trend on, e.g. 14d, 36h (units s m h d w y).")] = "14d",
    horizon: Annotated[str, typer.Option(
        "--horizon", metavar="DURATION",
        help="How far ahead a crossing counts for the exit code, e.g. 30d.")] = "30d",
    instance: Annotated[list[str] | None, typer.Option(
        "--instance", metavar="INSTANCE",
        help="Only this `instance` label (repeatable); default every instance seen.")] = None,
    trigger: Annotated[list[str] | None, typer.Option(
        "--trigger", metavar="ID",
        help=f"Only this trigger (repeatable): {', '.join(FORECAST_TRIGGER_IDS)}.")] = None,
    plan_file: Annotated[Path | None, typer.Option(
        "--plan", metavar="FILE",
        help="Capacity inputs (YAML/TOML as `capacity plan --from-file`) for what Prometheus "
        "cannot observe (message and file sizes, retention); users and message rate are "
        "replaced by the observed peaks.")] = None,
    calibration: CalibrationOpt = None,
    timeout: Annotated[float, typer.Option(
        "--timeout", metavar="SECONDS", help="One deadline for all Prometheus queries.")] = 30.0,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print {status, forecasts: [...], capacity} as JSON on stdout.")] = False,
) -> None:
    """Forecast when disk, memory, connections vs cap and the delivery queue will cross
    their scaling-trigger lines, and how many workers and hosts the load will need.

    Each measure's history over --lookback is fitted per instance with a robust straight
    line (Theil-Sen; see docs/operations/capacity-forecast.md), giving the date of each
    warning and critical line, "not within the horizon", or a confidence note when the
    history is short or noisy. The capacity plan is re-run on the observed peak users and
    message rate, moved along their trends.

    Exit code: 2 if a critical line is (or will be) crossed within --horizon, else 1 for
    a warning line, else 3 if a measure has no data or too little history (or Prometheus
    cannot be read), else 0.

    Example: `qpq-ops capacity forecast --prometheus-url http://127.0.0.1:9091 --lookback 14d`
    """
    lookback_s = parse_window("--lookback", lookback)
    horizon_s = parse_window("--horizon", horizon)
    unknown = sorted(set(trigger or ()) - set(FORECAST_TRIGGER_IDS))
    if unknown:
        fail(f"--trigger: {unknown[0]!r} is not forecast; choose from "
             f"{', '.join(FORECAST_TRIGGER_IDS)}")
    if not timeout > 0:
        fail(f"--timeout: must be greater than 0, got {timeout:g}")
    url = prometheus_url_or_fail(prometheus_url)
    base = DEFAULT_INPUTS if plan_file is None else inputs_from_file(plan_file)
    costs = calibration_or_fail(calibration)
    try:
        with err().status("reading history from Prometheus", spinner="dots"):
            result = run_forecast(url, lookback_s=lookback_s, horizon_s=horizon_s,
                                  instances=instance or (), trigger_ids=trigger or (),
                                  timeout=timeout, base_inputs=base, calibration=costs)
    except SourceError as exc:
        fail(str(exc), ExitCode.CANNOT_EVALUATE)
    if json_out:
        print_json(result.to_json())
    else:
        out().print(forecast_table(result))
        _print_outlook(result)
    raise typer.Exit(int(result.exit_code))
