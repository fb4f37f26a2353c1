"""Markdown tables for the operations docs, built from code (never typed by hand)."""

from __future__ import annotations

from collections.abc import Sequence

from qpq_ops import capacity
from qpq_ops.metrics_catalog import METRICS
from qpq_ops.render.alerts import all_alerts
from qpq_ops.render.dashboard import layout
from qpq_ops.render.recording_rules import recording_rules
from qpq_ops.render.units import duration_text, human_value
from qpq_ops.triggers import TRIGGERS, Direction, FederationPeers, Severity, Trigger

__all__ = [
    "alerts_table",
    "markdown_table",
    "metrics_table",
    "node_metrics_table",
    "panels_table",
    "recording_rules_table",
    "sysctl_table",
    "threshold_text",
    "tiers_table",
    "triggers_promql_table",
    "triggers_table",
]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def threshold_text(trigger: Trigger, severity: Severity) -> str:
    side = ">" if trigger.direction is Direction.ABOVE else "<"
    return f"{side} {human_value(trigger.unit, trigger.threshold(severity))}"


def _sustain(trigger: Trigger) -> str:
    sustained = f"sustained {duration_text(trigger.sustain_s)}" if trigger.sustain_s else "instant"
    if isinstance(trigger.measure, FederationPeers):  # two windows, inside the measure
        sustained = (f"down {trigger.measure.down_window}, growing "
                     f"{trigger.measure.growth_window}")
    return f"{sustained}; alert after {duration_text(trigger.alert_for_s)}"


def triggers_table() -> str:
    rows = [
        (f"[`{t.id}`](incident-response.md#{t.runbook_anchor})", t.title,
         threshold_text(t, Severity.WARNING), threshold_text(t, Severity.CRITICAL), _sustain(t),
         t.measures, t.action)
        for t in TRIGGERS
    ]
    return markdown_table(
        ("id", "trigger", "warning", "critical", "window", "measured", "action"), rows)


def triggers_promql_table() -> str:
    rows = [(f"`{t.id}`", t.unit, f"`{t.expr}`") for t in TRIGGERS]
    return markdown_table(("id", "unit", "PromQL (one series per instance)"), rows)


def metrics_table() -> str:
    rows = [
        (f"`{m.name}`", str(m.type), ", ".join(f"`{label}`" for label in m.labels) or "-",
         str(m.source), m.help)
        for m in METRICS
    ]
    return markdown_table(("metric", "type", "labels", "exported by", "meaning"), rows)


def node_metrics_table() -> str:
    used: dict[str, list[str]] = {}
    for trigger in TRIGGERS:
        for name in trigger.metrics:
            if name.startswith("node_"):
                used.setdefault(name, []).append(f"`{trigger.id}` trigger")
    used.setdefault("node_netstat_Udp_RcvbufErrors", []).append(
        "`qpq_udp_receive_buffer_errors` alert")
    rows = [(f"`{name}`", ", ".join(uses)) for name, uses in sorted(used.items())]
    return markdown_table(("node_exporter metric", "used by"), rows)


def alerts_table() -> str:
    rows = [
        (f"`{a.name}`" + (f" ({a.reason})" if a.reason else ""), str(a.severity),
         f"`{a.expr}`", duration_text(a.for_s) if a.for_s else "-",
         f"[{a.runbook_anchor}](incident-response.md#{a.runbook_anchor})")
        for a in all_alerts()
    ]
    return markdown_table(("alert", "severity", "fires when", "for", "runbook"), rows)


def recording_rules_table() -> str:
    rows = [(f"`{r.record}`", f"`{r.expr}`") for r in recording_rules()]
    return markdown_table(("recorded series", "expression"), rows)


def panels_table() -> str:
    rows = [
        (row.title, panel.title, panel.description)
        for row in layout() for panel in row.panels
    ]
    return markdown_table(("row", "panel", "how to read it"), rows)


def tiers_table() -> str:
    rows = [
        (f"{t.name} ({t.purpose})", t.cpu, t.memory, t.disk, t.network, t.supports)
        for t in capacity.TIERS
    ]
    return markdown_table(("tier", "CPU", "memory", "disk", "network", "supports"), rows)


def sysctl_table() -> str:
    rows = [(f"`{name}`", f"{value:,}") for name, value in capacity.SYSCTL.items()]
    return markdown_table(("sysctl", "value"), rows)
