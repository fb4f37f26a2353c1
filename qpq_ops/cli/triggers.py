"""`qpq-ops check-triggers`: is the deployment past a scaling trigger right now?"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from qpq_ops._console import err, fail, out, print_json, styled_state
from qpq_ops.errors import SourceError
from qpq_ops.evaluate.direct import evaluate_direct, http_url
from qpq_ops.evaluate.model import Evaluation
from qpq_ops.evaluate.prometheus import evaluate_prometheus
from qpq_ops.exit_codes import ExitCode
from qpq_ops.triggers import TRIGGER_IDS, TRIGGERS, Trigger, get_trigger

__all__ = ["check_triggers", "evaluation_table", "format_value"]


def format_value(value: float | None, unit: str) -> str:
    """A value in the trigger's unit, for people (JSON keeps the raw number)."""
    if value is None:
        return "-"
    if unit == "percent":
        return f"{value:.1f} %"
    if unit == "seconds":
        return f"{value * 1000:,.1f} ms"
    if unit == "per_minute":
        return f"{value:,.1f}/min"
    return f"{value:,.0f}"


def evaluation_table(evaluation: Evaluation) -> Table:
    table = Table(
        title=f"Scaling triggers ({evaluation.source}: {evaluation.url}) "
        f"status: {evaluation.status}",
        title_justify="left",
    )
    table.add_column("trigger")
    table.add_column("instance")
    table.add_column("value", justify="right")
    table.add_column("warning", justify="right")
    table.add_column("critical", justify="right")
    table.add_column("state")
    table.add_column("action / note")
    for r in evaluation.results:
        t = r.trigger
        action = t.action if r.state in ("warning", "critical") else ""
        detail = "\n".join(x for x in (action, f"[dim]{r.note}[/]" if r.note else "") if x)
        table.add_row(
            t.title, r.instance or "-", format_value(r.value, t.unit),
            format_value(t.warning, t.unit), format_value(t.critical, t.unit),
            styled_state(r.state), detail,
        )
    return table


def _choose_triggers(ids: list[str] | None) -> tuple[Trigger, ...]:
    if not ids:
        return TRIGGERS
    chosen = []
    for trigger_id in ids:
        try:
            chosen.append(get_trigger(trigger_id))
        except KeyError:
            fail(f"--trigger: unknown id {trigger_id!r}; known: {', '.join(TRIGGER_IDS)}")
    return tuple(chosen)


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        fail(f"{name}: must be greater than 0, got {value:g}")


def check_triggers(
    prometheus_url: Annotated[str | None, typer.Option(
        "--prometheus-url", metavar="URL",
        help="Evaluate with PromQL against this Prometheus (sustain windows honoured). "
        "Default: $QPQ_PROMETHEUS_URL unless --metrics-url is given.",
    )] = None,
    metrics_url: Annotated[str | None, typer.Option(
        "--metrics-url", metavar="URL",
        help="No Prometheus: scrape this qpq server's /metrics twice, --sample apart.",
    )] = None,
    node_metrics_url: Annotated[str | None, typer.Option(
        "--node-metrics-url", metavar="URL",
        help="With --metrics-url: also scrape node_exporter for memory and disk.",
    )] = None,
    sample: Annotated[float, typer.Option(
        "--sample", metavar="SECONDS",
        help="With --metrics-url: seconds between the two scrapes (counters -> rates).",
    )] = 10.0,
    instance: Annotated[list[str] | None, typer.Option(
        "--instance", metavar="INSTANCE",
        help="Only this `instance` label (repeatable); each is evaluated separately and "
        "reported no-data when it has no series. Host and qpq triggers match one instance "
        "when the scrape config relabels node_exporter and the server to the node's name.",
    )] = None,
    job: Annotated[str | None, typer.Option(
        "--job", metavar="JOB", help="Only series with this `job` label.")] = None,
    trigger: Annotated[list[str] | None, typer.Option(
        "--trigger", metavar="ID",
        help=f"Only this trigger (repeatable): {', '.join(TRIGGER_IDS)}.",
    )] = None,
    timeout: Annotated[float, typer.Option(
        "--timeout", metavar="SECONDS", help="One deadline for all queries of a pass.")] = 10.0,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print {status, triggers: [...]} as JSON on stdout (one line per "
        "pass with --watch).")] = False,
    watch: Annotated[float | None, typer.Option(
        "--watch", metavar="SECONDS", help="Re-evaluate every SECONDS, in place, until ^C.",
    )] = None,
    count: Annotated[int | None, typer.Option(
        "--count", metavar="N", help="With --watch: stop after N passes.")] = None,
    sustain_scale: Annotated[float, typer.Option(
        "--sustain-scale", hidden=True, help="Compress sustain windows (tests only).",
    )] = 1.0,
) -> None:
    """Evaluate the nine scaling triggers of the scaling guide.

    States: ok, warning, critical, no-data (a missing metric is never ok). Exit code:
    2 if any trigger is critical, else 1 if any is warning, else 3 if any has no data or
    the source failed, else 0.

    Examples: `check-triggers --prometheus-url http://127.0.0.1:9091 --instance node1`;
    without Prometheus, `check-triggers --metrics-url 127.0.0.1:9090 --node-metrics-url
    127.0.0.1:9100 --sample 15` (CPU needs history: no-data in this mode).
    """
    if prometheus_url is None and metrics_url is None:
        prometheus_url = os.environ.get("QPQ_PROMETHEUS_URL") or None
    if (prometheus_url is None) == (metrics_url is None):
        fail("give exactly one of --prometheus-url (or QPQ_PROMETHEUS_URL) and --metrics-url")
    if metrics_url is not None and (instance or job):
        fail("--instance and --job select Prometheus series; use them with --prometheus-url")
    if prometheus_url is not None and node_metrics_url is not None:
        fail("--node-metrics-url is for direct mode (--metrics-url)")
    for name, value in (("--sample", sample), ("--timeout", timeout), ("--watch", watch),
                        ("--sustain-scale", sustain_scale)):
        _positive(name, value)
    try:
        prometheus_url = None if prometheus_url is None else http_url(prometheus_url)
        metrics_url = None if metrics_url is None else http_url(metrics_url)
        node_metrics_url = None if node_metrics_url is None else http_url(node_metrics_url)
    except SourceError as exc:
        fail(f"URL: {exc}")
    if count is not None and count < 1:
        fail(f"--count: must be at least 1, got {count}")
    chosen = _choose_triggers(trigger)

    def evaluate() -> Evaluation:
        if prometheus_url is not None:
            return evaluate_prometheus(prometheus_url, triggers=chosen, instances=instance or (),
                                       job=job, timeout=timeout, sustain_scale=sustain_scale)
        assert metrics_url is not None
        return evaluate_direct(metrics_url, node_metrics_url=node_metrics_url,
                               sample_s=sample, timeout=timeout, triggers=chosen,
                               sleep=_sampling_progress)

    if watch is None:
        try:
            evaluation = evaluate()
        except SourceError as exc:
            fail(str(exc), ExitCode.CANNOT_EVALUATE)
        if json_out:
            print_json(evaluation.to_json())
        else:
            out().print(evaluation_table(evaluation))
        raise typer.Exit(int(evaluation.exit_code))
    raise typer.Exit(int(_watch(evaluate, watch, count, json_out)))


def _sampling_progress(seconds: float) -> None:
    """Wait between the two scrapes with a transient progress bar on stderr."""
    columns = (TextColumn("sampling counters"), BarColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err(), transient=True) as progress:
        task = progress.add_task("sample", total=seconds)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.1, left))
            progress.update(task, completed=seconds - max(0.0, deadline - time.monotonic()))


def _watch(evaluate: Callable[[], Evaluation], every: float, count: int | None,
           json_out: bool) -> ExitCode:
    """Re-evaluate every `every` seconds; returns the exit code of the last pass."""
    code = ExitCode.CANNOT_EVALUATE
    passes = 0
    live = None if json_out else Live(console=out(), auto_refresh=False)
    try:
        if live is not None:
            live.start()
        while count is None or passes < count:
            started = time.monotonic()
            view: RenderableType
            try:
                evaluation = evaluate()
                code = evaluation.exit_code
                doc: dict[str, object] = evaluation.to_json()
                view = evaluation_table(evaluation)
            except SourceError as exc:
                code = ExitCode.CANNOT_EVALUATE
                doc = {"status": "no-data", "error": str(exc), "triggers": []}
                view = Text(f"error: {exc}", style="bold red")
            passes += 1
            if live is None:
                sys.stdout.write(json.dumps(doc, allow_nan=False) + "\n")
                sys.stdout.flush()
            else:
                stamp = Text(time.strftime("%H:%M:%S") + f"  every {every:g} s (^C to stop)",
                             style="dim")
                live.update(Group(view, stamp), refresh=True)
            if count is not None and passes >= count:
                break
            time.sleep(max(0.0, every - (time.monotonic() - started)))
    except KeyboardInterrupt:
        err().print("stopped")
    finally:
        if live is not None:
            live.stop()
    return code
