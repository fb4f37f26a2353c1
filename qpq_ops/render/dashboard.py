"""The Grafana dashboard: `dashboards/qpq-overview.json`.

Built with Grafana's own typed builders (`grafana-foundation-sdk`). The panels are
described first as plain `PanelSpec` data (title, queries, unit, the trigger whose
thresholds are drawn) and then turned into Grafana JSON, so the layout reads as a table
of contents. Trigger panels plot the recorded trigger value that the alert rules
compare, with the same thresholds as steps; queries use the recorded rates and
quantiles; the datasource is the `${DS_PROMETHEUS}` variable, never a fixed uid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from grafana_foundation_sdk.builders.common import (
    GraphThresholdsStyleConfig,
    ReduceDataOptions,
    VizLegendOptions,
)
from grafana_foundation_sdk.builders.dashboard import (
    AnnotationQuery,
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery as PrometheusQuery
from grafana_foundation_sdk.builders.stat import Panel as StatPanel
from grafana_foundation_sdk.builders.timeseries import Panel as TimeseriesPanel
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    GraphThresholdsStyleMode,
    LegendDisplayMode,
    LegendPlacement,
)
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
    VariableSort,
)

from qpq_ops.render._files import HEADER, RenderedFile
from qpq_ops.render.recording_rules import latency_record, rate_record, trigger_record
from qpq_ops.render.selectors import job_matcher
from qpq_ops.render.units import duration_text, grafana_unit, human_value
from qpq_ops.triggers import (
    BACKUP_MAX_AGE_S,
    TLS_EXPIRY_CRITICAL_S,
    TLS_EXPIRY_WARNING_S,
    TRIGGERS,
    Direction,
    Trigger,
    get_trigger,
)

__all__ = ["PATH", "UID", "PanelSpec", "Query", "RowSpec", "build", "layout", "render"]

PATH = PurePosixPath("dashboards/qpq-overview.json")
UID = "qpq-overview"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${DS_PROMETHEUS}")
SEL = '{instance=~"$instance"}'
"""Series selector of every query: the instances picked in the `instance` variable."""

_COLORS = {"ok": "green", "warning": "orange", "critical": "red"}


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = "{{instance}}"


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    trigger: str | None = None
    """Draw this trigger's warning/critical thresholds on the panel."""
    steps: tuple[tuple[float | None, str], ...] = ()
    """Other thresholds as (from value, colour) steps, e.g. certificate expiry."""
    kind: Literal["timeseries", "stat"] = "timeseries"
    width: int = 8
    height: int = 8


@dataclass(frozen=True)
class RowSpec:
    title: str
    panels: tuple[PanelSpec, ...]


def _q(expr: str, legend: str = "{{instance}}") -> Query:
    return Query(expr, legend)


def _rate(counter: str, extra: tuple[str, ...] = ()) -> str:
    return rate_record(counter, extra) + SEL


def _quantiles(histogram: str, extra: tuple[str, ...] = ()) -> tuple[Query, ...]:
    label = "".join(f" {{{{{name}}}}}" for name in extra)
    return tuple(
        _q(latency_record(histogram, name, extra) + SEL, f"{{{{instance}}}}{label} {name}")
        for name in ("p50", "p95", "p99")
    )


def _qpq_sel() -> str:
    return f'{{{job_matcher("qpq")},instance=~"$instance"}}'


def _node_sel() -> str:
    return f'{{{job_matcher("node")},instance=~"$instance"}}'


def _thresholds_text(trigger: Trigger) -> str:
    side = ">" if trigger.direction is Direction.ABOVE else "<"
    return (f"Trigger `{trigger.id}`: warning {side} {human_value(trigger.unit, trigger.warning)}"
            f", critical {side} {human_value(trigger.unit, trigger.critical)}"
            + (f", alert after {duration_text(trigger.alert_for_s)}."
               if trigger.alert_for_s else "."))


def _trigger_panel(trigger_id: str, title: str | None = None, width: int = 8,
                   extra: tuple[Query, ...] = (), legend: str = "{{instance}}") -> PanelSpec:
    trigger = get_trigger(trigger_id)
    return PanelSpec(
        title=title or trigger.title,
        description=f"{trigger.measures} {_thresholds_text(trigger)} {trigger.action}",
        queries=(_q(trigger_record(trigger) + SEL, legend), *extra),
        unit=grafana_unit(trigger.unit),
        trigger=trigger.id,
        width=width,
    )


def layout() -> tuple[RowSpec, ...]:
    """Every row and panel of the dashboard, top to bottom."""
    triggers_row = RowSpec("Scaling triggers (current value per instance)", tuple(
        PanelSpec(
            title=t.title,
            description=f"{t.measures} {_thresholds_text(t)}",
            queries=(_q(trigger_record(t) + SEL),),
            unit=grafana_unit(t.unit),
            trigger=t.id,
            kind="stat",
            width=8,
            height=4,
        )
        for t in TRIGGERS
    ))
    return (
        triggers_row,
        RowSpec("Traffic", (
            PanelSpec("Enqueue and fetch rate",
                      "Messages accepted into delivery queues and fetch calls served, per second.",
                      (_q(_rate("qpq_enqueue_total"), "{{instance}} enqueue"),
                       _q(_rate("qpq_fetch_total"), "{{instance}} fetch")),
                      unit="reqps", width=12),
            PanelSpec("Requests by operation",
                      "Requests served per second per operation, the R of RED "
                      "(qpq_rpc_duration_seconds_count); errors and durations below.",
                      (_q(_rate("qpq_rpc_duration_seconds_count", ("op",)),
                          "{{instance}} {{op}}"),),
                      unit="reqps", width=12),
            PanelSpec("RPC errors by operation and code",
                      "Requests answered with an error, per second (qpq_rpc_errors_total).",
                      (_q(_rate("qpq_rpc_errors_total", ("op", "code")),
                          "{{instance}} {{op}} {{code}}"),),
                      unit="reqps", width=12),
        )),
        RowSpec("Delivery", (
            _trigger_panel("delivery_queue_depth", width=12),
            PanelSpec("Waiters and sessions",
                      "Parked long-poll fetches (qpq_delivery_waiters) and live sessions "
                      "(qpq_sessions_active).",
                      (_q(f"qpq_delivery_waiters{SEL}", "{{instance}} waiters"),
                       _q(f"qpq_sessions_active{SEL}", "{{instance}} sessions")),
                      width=12),
        )),
        RowSpec("Auth", (
            PanelSpec("Logins",
                      "Successful and failed logins per second.",
                      (_q(_rate("qpq_auth_login_success_total"), "{{instance}} success"),
                       _q(_rate("qpq_auth_login_failure_total"), "{{instance}} failure")),
                      unit="reqps", width=12),
            _trigger_panel("login_failures", width=12),
        )),
        RowSpec("Connections", (
            PanelSpec("Connections and cap",
                      "Open QUIC connections (qpq_connections_active) against the configured "
                      "cap (qpq_connections_max, [quic] max_connections).",
                      (_q(f"qpq_connections_active{SEL}", "{{instance}} active"),
                       _q(f"qpq_connections_max{SEL}", "{{instance}} cap")),
                      width=8),
            _trigger_panel("connections", width=8),
            PanelSpec("Refused connections",
                      "Connections refused per second, by reason (cap reached, handshake "
                      "flood, draining); qpq_connections_refused_total. Refusals at the cap "
                      "mean clients are being turned away: see the connections trigger.",
                      (_q(_rate("qpq_connections_refused_total", ("reason",)),
                          "{{instance}} {{reason}}"),),
                      unit="reqps", width=8),
        )),
        RowSpec("Latency", (
            _trigger_panel("tls_handshake_latency", "TLS handshake p50 / p95 / p99",
                           extra=_quantiles("qpq_tls_handshake_duration_seconds")[::2],
                           legend="{{instance}} p95"),
            PanelSpec("RPC latency by operation",
                      "Request handling time per operation, p50/p95/p99 over 5 minutes "
                      "(qpq_rpc_duration_seconds).",
                      _quantiles("qpq_rpc_duration_seconds", ("op",)),
                      unit="s", width=16),
        )),
        RowSpec("Storage", (
            _trigger_panel("disk_io_latency", "Storage commit latency p50 / p95 / p99",
                           width=12,
                           extra=_quantiles("qpq_db_write_duration_seconds")[::2],
                           legend="{{instance}} p95"),
            _trigger_panel("disk_usage", width=12),
        )),
        RowSpec("Rate limiting", (
            _trigger_panel("rate_limit_hits", width=24),
        )),
        RowSpec("qpq processes (per worker)", (
            _trigger_panel("process_cpu", "Worker CPU (share of one core)",
                           extra=(_q(f"100 * rate(process_cpu_seconds_total{_qpq_sel()}"
                                     "[5m])", "{{instance}} {{worker}}"),)),
            PanelSpec("Worker resident memory",
                      "Resident set size of each qpq process (process_resident_memory_bytes); "
                      "a steady climb at flat traffic is a leak.",
                      (_q(f"process_resident_memory_bytes{_qpq_sel()}",
                          "{{instance}} {{worker}}"),), unit="bytes"),
            PanelSpec("Worker open files",
                      "Open file descriptors of each qpq process against its limit "
                      "(process_open_fds, process_max_fds): every QUIC connection holds none, "
                      "but SQLCipher, blobs and sockets do; `qpq-ops tune ulimits --check`.",
                      (_q(f"process_open_fds{_qpq_sel()}", "{{instance}} {{worker}} open"),
                       _q(f"process_max_fds{_qpq_sel()}", "{{instance}} {{worker}} limit")),),
        )),
        RowSpec("Host", (
            _trigger_panel("cpu"),
            _trigger_panel("memory"),
            PanelSpec("UDP receive buffer errors",
                      "Datagrams the kernel dropped because a socket receive buffer was full "
                      "(node_netstat_Udp_RcvbufErrors). Anything above zero means the UDP "
                      "sysctls are missing: `qpq-ops tune sysctl --check`.",
                      (_q(f"rate(node_netstat_Udp_RcvbufErrors{_node_sel()}[5m])"),),
                      unit="pps"),
        )),
        RowSpec("Blobs and key transparency", (
            PanelSpec("Blob storage", "Bytes held in blob storage (qpq_blob_bytes).",
                      (_q(f"qpq_blob_bytes{SEL}"),), unit="bytes", width=12),
            PanelSpec("Key-transparency log", "Leaves in the key-transparency log "
                      "(qpq_kt_log_size).", (_q(f"qpq_kt_log_size{SEL}"),), width=12),
        )),
        RowSpec("Federation", (
            _trigger_panel("federation", "Federation peers (worst level)"),
            PanelSpec("Federation peer up",
                      "1 when the last relay attempt to the peer succeeded "
                      "(qpq_federation_peer_up); 5 minutes at 0 is the federation "
                      "trigger's critical level.",
                      (_q(f"qpq_federation_peer_up{_qpq_sel()}", "{{instance}} {{peer}}"),)),
            PanelSpec("Federation outbound queue",
                      "Relays waiting in the durable outbound queue per peer "
                      "(qpq_federation_queue_depth); growing for 15 minutes is the "
                      "federation trigger's warning level.",
                      (_q(f"qpq_federation_queue_depth{_qpq_sel()}",
                          "{{instance}} {{peer}}"),)),
        )),
        RowSpec("Federation relay, certificates and backups", (
            PanelSpec("Federation relay",
                      "Messages relayed to and from peers per second, by result.",
                      (_q(_rate("qpq_federation_relay_total", ("peer", "result")),
                          "{{instance}} {{peer}} {{result}}"),),
                      unit="reqps"),
            PanelSpec("TLS certificate expires in",
                      "Time left until notAfter of the serving certificate "
                      "(qpq_tls_cert_expiry_timestamp_seconds). Alerts below "
                      f"{duration_text(TLS_EXPIRY_WARNING_S)} (warning) and "
                      f"{duration_text(TLS_EXPIRY_CRITICAL_S)} (critical).",
                      (_q(f"qpq_tls_cert_expiry_timestamp_seconds{_qpq_sel()} - time()"),),
                      unit="s", kind="stat",
                      steps=((None, _COLORS["critical"]),
                             (TLS_EXPIRY_CRITICAL_S, _COLORS["warning"]),
                             (TLS_EXPIRY_WARNING_S, _COLORS["ok"]))),
            PanelSpec("Last successful backup",
                      "Age of the last successful `qpq-ops backup create` "
                      "(qpq_backup_last_success_timestamp_seconds, node_exporter textfile). "
                      f"Alerts above {duration_text(BACKUP_MAX_AGE_S)}.",
                      (_q("time() - qpq_backup_last_success_timestamp_seconds"
                          f"{_node_sel()}"),),
                      unit="s", kind="stat",
                      steps=((None, _COLORS["ok"]), (BACKUP_MAX_AGE_S, _COLORS["warning"]))),
        )),
    )


def _steps(trigger: Trigger) -> list[Threshold]:
    if trigger.direction is Direction.ABOVE:
        return [Threshold(value=None, color=_COLORS["ok"]),
                Threshold(value=trigger.warning, color=_COLORS["warning"]),
                Threshold(value=trigger.critical, color=_COLORS["critical"])]
    return [Threshold(value=None, color=_COLORS["critical"]),
            Threshold(value=trigger.critical, color=_COLORS["warning"]),
            Threshold(value=trigger.warning, color=_COLORS["ok"])]


def _panel(spec: PanelSpec, panel_id: int) -> StatPanel | TimeseriesPanel:
    panel: StatPanel | TimeseriesPanel
    if spec.kind == "stat":
        panel = (StatPanel()
                 .color_mode(BigValueColorMode.BACKGROUND)
                 .graph_mode(BigValueGraphMode.AREA)
                 .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    else:
        panel = (TimeseriesPanel()
                 .line_width(1)
                 .fill_opacity(10)
                 .legend(VizLegendOptions().display_mode(LegendDisplayMode.LIST)
                         .placement(LegendPlacement.BOTTOM).show_legend(True)))
    panel = (panel.id(panel_id).title(spec.title).description(spec.description)
             .datasource(DATASOURCE).unit(spec.unit).span(spec.width).height(spec.height))
    if spec.trigger is not None:
        panel = panel.thresholds(ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE)
                                 .steps(_steps(get_trigger(spec.trigger))))
        if isinstance(panel, TimeseriesPanel):
            panel = panel.thresholds_style(
                GraphThresholdsStyleConfig().mode(GraphThresholdsStyleMode.DASHED_AND_AREA))
    elif spec.steps:
        panel = panel.thresholds(ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
            [Threshold(value=value, color=color) for value, color in spec.steps]))
    elif spec.kind == "stat":
        panel = panel.thresholds(ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE)
                                 .steps([Threshold(value=None, color="blue")]))
    for ref, query in zip("ABCDEFGH", spec.queries, strict=False):
        panel = panel.with_target(PrometheusQuery().expr(query.expr)
                                  .legend_format(query.legend).ref_id(ref))
    return panel


def build() -> Dashboard:
    dashboard = (
        Dashboard("qpq overview")
        .uid(UID)
        .description(f"{HEADER}. Source: qpq_ops/render/dashboard.py and "
                     "qpq_ops/triggers.py; regenerate with `qpq-ops render dashboard`.")
        .tags(["qpq", "generated"])
        .editable()
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(DatasourceVariable("DS_PROMETHEUS").label("Prometheus")
                       .type("prometheus"))
        .with_variable(QueryVariable("instance").label("instance").datasource(DATASOURCE)
                       .query(f"label_values(up{{{job_matcher('qpq')}}}, instance)")
                       .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                       .sort(VariableSort.ALPHABETICAL_ASC)
                       .multi(True).include_all(True).all_value(".*"))
        # A qpq process (re)started: a deploy, a crash, a restart by systemd.
        .annotation(AnnotationQuery().name("qpq restarts").datasource(DATASOURCE)
                    .enable(True).icon_color("purple")
                    .expr(f"changes(process_start_time_seconds{{{job_matcher('qpq')}}}[2m])"
                          " > 0"))
    )
    panel_id = 1
    for row in layout():
        dashboard = dashboard.with_row(Row(row.title).id(panel_id))
        panel_id += 1
        for spec in row.panels:
            dashboard = dashboard.with_panel(_panel(spec, panel_id))
            panel_id += 1
    return dashboard


def render() -> RenderedFile:
    encoded = JSONEncoder(sort_keys=True, indent=2).encode(build().build())
    # Re-dump through json for a stable, plain layout independent of the SDK's encoder.
    text = json.dumps(json.loads(encoded), indent=2, sort_keys=True, ensure_ascii=False)
    return RenderedFile(PATH, text + "\n")
