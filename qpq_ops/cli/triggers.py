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

from qpq_ops._console import STATE_STYLE, err, fail, out, print_json
from qpq_ops.display import format_value
from qpq_ops.errors import SourceError
from qpq_ops.evaluate.direct import evaluate_direct, http_url
from qpq_ops.evaluate.model import Evaluation, TriggerResult
from qpq_ops.evaluate.prometheus import evaluate_prometheus
from qpq_ops.exit_codes import ExitCode
from qpq_ops.triggers import DEFAULT_SCOPE, TRIGGER_IDS, TRIGGERS, Scope, Trigger, get_trigger

__all__ = ["check_triggers", "evaluation_table", "format_value"]




COMPACT_BELOW = 110
"""Terminal width under which the table drops to three columns plus a notes list."""


def _detail_text(r: TriggerResult) -> str:
    """Action (when beyond a threshold) and note, as plain text."""
    action = r.trigger.action if r.state in ("warning", "critical") else ""
    return "\n".join(x for x in (action, r.note) if x)


def _title(evaluation: Evaluation) -> Text:
    title = Text(f"Scaling triggers ({evaluation.source}: {evaluation.url}) status: ")
    title.append(str(evaluation.status), style=STATE_STYLE.get(str(evaluation.status), ""))
    return title


def evaluation_table(evaluation: Evaluation, width: int | None = None) -> RenderableType:
    """The evaluation for people: every text from data is escaped (an action such as
    "tighten [rate_limit]" is not markup), and under `COMPACT_BELOW` columns the layout
    is compact: trigger and instance in one cell, thresholds under the value, and the
    actions and notes as a list below the table, so nothing wraps letter by letter."""
    width = out().width if width is None else width
    parts: list[RenderableType] = []
    if width < COMPACT_BELOW:
        table = Table(title=_title(evaluation), title_justify="left", expand=False)
        table.add_column("trigger / instance", overflow="fold")
        table.add_column("value (warn/crit)", justify="right", overflow="fold")
        table.add_column("state", no_wrap=True)
        notes: list[Text] = []
        for r in evaluation.results:
            t = r.trigger
            cell = Text(t.title)
            cell.append(f"\n{r.instance or '-'}", style="dim")
            value = Text(format_value(r.value, t.unit))
            value.append(f"\n{format_value(t.warning, t.unit)} / "
                         f"{format_value(t.critical, t.unit)}", style="dim")
            table.add_row(cell, value, Text(str(r.state), style=STATE_STYLE.get(r.state, "")))
            if plain := _detail_text(r):
                notes.append(Text(f"{t.id} @ {r.instance or '-'}: ", style="bold")
                             + Text(plain.replace("\n", " ")))
        parts += [table, *notes]
    else:
        table = Table(title=_title(evaluation), title_justify="left")
        table.add_column("trigger")
        table.add_column("instance", overflow="fold")
        table.add_column("value", justify="right")
        table.add_column("warning", justify="right")
        table.add_column("critical", justify="right")
        table.add_column("state", no_wrap=True)
        table.add_column("action / note", overflow="fold")
        for r in evaluation.results:
            t = r.trigger
            detail: Text = Text(t.action if r.state in ("warning", "critical") else "")
            if r.note:
                detail.append(("\n" if detail else "") + r.note, style="dim")
            table.add_row(
                Text(t.title), Text(r.instance or "-"), format_value(r.value, t.unit),
                format_value(t.warning, t.unit), format_value(t.critical, t.unit),
                Text(str(r.state), style=STATE_STYLE.get(r.state, "")), detail,
            )
        parts.append(table)
    if evaluation.skipped:
        parts.append(Text(f"not evaluated: {', '.join(evaluation.skipped)}: "
                          f"{evaluation.skipped_note}", style="magenta"))
    return Group(*parts)


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
        help="With --metrics-url: also scrape node_exporter for the host triggers (CPU, "
        "memory, disk); without it they are listed once as not evaluated.",
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
        "--job", metavar="JOB", help="Scrape job of the qpq servers (qpq triggers read only "
        f"it). Default: {DEFAULT_SCOPE.qpq_job}.")] = None,
    node_job: Annotated[str | None, typer.Option(
        "--node-job", metavar="JOB", help="Scrape job of node_exporter (host triggers read "
        f"only it). Default: {DEFAULT_SCOPE.node_job}.")] = None,
    mountpoint: Annotated[str, typer.Option(
        "--mountpoint", metavar="PATH", help="Mountpoint of the filesystem holding the data "
        "dir; disk_usage reads only it (`df --output=target DATA_DIR`).",
    )] = DEFAULT_SCOPE.mountpoint,
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
    """Evaluate the scaling triggers of the scaling guide (and qpq's worker CPU and
    federation peers).

    States: ok, warning, critical, no-data. A target that is down, a metric missing
    for one instance, and a value beyond a threshold whose sustain window has not been
    observed yet ("not sustained yet") are no-data, never ok. Every target of the qpq
    and node jobs (from `up`) gets a row. The federation trigger applies only where
    federation series exist; elsewhere it is listed once as not evaluated. Exit code:
    2 if any trigger is critical, else 1 if any is warning, else 3 if any has no data
    or the source failed, else 0.

    Examples: `check-triggers --prometheus-url http://127.0.0.1:9091 --instance node1`;
    without Prometheus, `check-triggers --metrics-url 127.0.0.1:9090 --node-metrics-url
    127.0.0.1:9100 --sample 15` (host triggers need --node-metrics-url; without it they
    are listed once as not evaluated).
    """
    if prometheus_url is None and metrics_url is None:
        prometheus_url = os.environ.get("QPQ_PROMETHEUS_URL") or None
    if (prometheus_url is None) == (metrics_url is None):
        fail("give exactly one of --prometheus-url (or QPQ_PROMETHEUS_URL) and --metrics-url")
    if metrics_url is not None and (instance or job or node_job):
        fail("--instance, --job and --node-job select Prometheus series; use them with "
             "--prometheus-url")
    if not mountpoint.startswith("/"):
        fail(f"--mountpoint: must be an absolute path, got {mountpoint!r}")
    for flag, given in (("--job", job), ("--node-job", node_job)):
        if given is not None and not given.strip():
            fail(f"{flag}: must not be empty")
    scope = Scope(job or DEFAULT_SCOPE.qpq_job, node_job or DEFAULT_SCOPE.node_job,
                  mountpoint)
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
                                       scope=scope, timeout=timeout,
                                       sustain_scale=sustain_scale)
        assert metrics_url is not None
        return evaluate_direct(metrics_url, node_metrics_url=node_metrics_url,
                               sample_s=sample, timeout=timeout, triggers=chosen,
                               scope=scope, sleep=_sampling_progress)

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
