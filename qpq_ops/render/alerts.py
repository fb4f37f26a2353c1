"""Alert rules: `prometheus/alerts/qpq-alerts.yml`.

A warning and a critical alert per scaling trigger, comparing the trigger's recorded
value (`recording_rules.trigger_record`) with its thresholds, `for:` its `alert_for_s`;
plus the health alerts the triggers do not cover (target down, UDP receive-buffer
drops, TLS certificate expiry, stale backups). Every alert links its section of
`docs/operations/incident-response.md`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from qpq_ops.render._files import RenderedFile, yaml_document
from qpq_ops.render.recording_rules import trigger_record
from qpq_ops.render.selectors import job_matcher
from qpq_ops.render.settings import current, runbook_url
from qpq_ops.render.units import duration_text, human_value, value_template
from qpq_ops.triggers import (
    BACKUP_MAX_AGE_S,
    TLS_EXPIRY_CRITICAL_S,
    TLS_EXPIRY_WARNING_S,
    TRIGGERS,
    Direction,
    Severity,
    Trigger,
)

__all__ = [
    "BACKUP_MAX_AGE_S",
    "HEALTH_ALERTS",
    "PATH",
    "TLS_EXPIRY_CRITICAL_S",
    "TLS_EXPIRY_WARNING_S",
    "AlertRule",
    "all_alerts",
    "health_alerts",
    "render",
    "trigger_alert",
    "trigger_alert_name",
    "trigger_alerts",
]

PATH = PurePosixPath("prometheus/alerts/qpq-alerts.yml")


@dataclass(frozen=True)
class AlertRule:
    name: str
    group: str
    expr: str
    for_s: int
    severity: Severity
    summary: str
    description: str
    runbook_anchor: str
    trigger: str | None = None
    """The scaling trigger id, for trigger alerts (also a label)."""
    reason: str | None = None
    """Tells apart two rules of one alert (also a label)."""

    @property
    def labels(self) -> dict[str, str]:
        labels = {"severity": str(self.severity)}
        if self.trigger is not None:
            labels["trigger"] = self.trigger
        if self.reason is not None:
            labels["reason"] = self.reason
        return labels

    @property
    def runbook_url(self) -> str:
        return runbook_url(self.runbook_anchor)

    @property
    def annotations(self) -> dict[str, str]:
        return {"summary": self.summary, "description": self.description,
                "runbook_url": self.runbook_url}


def trigger_alert_name(trigger: Trigger, severity: Severity) -> str:
    """`qpq_<trigger id>_<severity>`: the id is in the name, as DESIGN.md asks."""
    return f"qpq_{trigger.id}_{severity}"


def _title(trigger: Trigger) -> str:
    """The trigger's title, naming the filesystem for the data-volume trigger."""
    if trigger.local_matchers(current().scope):
        return f"{trigger.title} of {current().scope.mountpoint}"
    return trigger.title


def trigger_alert(trigger: Trigger, severity: Severity) -> AlertRule:
    side = "above" if trigger.direction is Direction.ABOVE else "below"
    title = _title(trigger)
    threshold = human_value(trigger.unit, trigger.threshold(severity))
    held = f" for at least {duration_text(trigger.alert_for_s)}" if trigger.alert_for_s else ""
    summary = f"{title} {side} {threshold} on {{{{ $labels.instance }}}}"
    if trigger.levels:  # a level says what happened better than its number
        first_bad = int(trigger.threshold(severity)) + 1
        summary = f"{title}: {trigger.levels[first_bad]} on {{{{ $labels.instance }}}}"
    return AlertRule(
        name=trigger_alert_name(trigger, severity),
        group="qpq-triggers",
        expr=f"{trigger_record(trigger)} {trigger.comparison(severity)}",
        for_s=trigger.alert_for_s,
        severity=severity,
        summary=summary,
        description=(
            f"{title} on {{{{ $labels.instance }}}} is "
            f"{value_template(trigger.unit)}{held} "
            f"(warning {side} {human_value(trigger.unit, trigger.warning)}, "
            f"critical {side} {human_value(trigger.unit, trigger.critical)}). "
            f"{trigger.action}"
        ),
        runbook_anchor=trigger.runbook_anchor,
        trigger=trigger.id,
    )


def trigger_alerts() -> tuple[AlertRule, ...]:
    return tuple(
        trigger_alert(t, severity) for t in TRIGGERS
        for severity in (Severity.WARNING, Severity.CRITICAL)
    )


def _cert_alert(severity: Severity, within_s: int) -> AlertRule:
    cert = f"qpq_tls_cert_expiry_timestamp_seconds{{{job_matcher('qpq')}}}"
    return AlertRule(
        name=f"qpq_tls_cert_expiry_{severity}",
        group="qpq-health",
        expr=f"{cert} - time() < {within_s}",
        for_s=600,
        severity=severity,
        summary=f"TLS certificate of {{{{ $labels.instance }}}} expires within "
        f"{duration_text(within_s)}",
        description="The serving TLS certificate of {{ $labels.instance }} expires in "
        "{{ humanizeDuration $value }}. Clients refuse an expired certificate: rotate it "
        "with `qpq-ops rotate tls --config PATH` (docs/operations/key-rotation.md).",
        runbook_anchor="tls_cert_expiry",
    )


def health_alerts() -> tuple[AlertRule, ...]:
    """The health alerts of the current render settings (jobs, runbook links)."""
    scope = current().scope
    up = f'up{{job=~"{scope.qpq_job}|{scope.node_job}"}}'
    backup = f"qpq_backup_last_success_timestamp_seconds{{{job_matcher('node')}}}"
    return (
        AlertRule(
            name="qpq_instance_down",
            group="qpq-health",
            expr=f"{up} == 0",
            for_s=120,
            severity=Severity.CRITICAL,
            summary="{{ $labels.job }} target {{ $labels.instance }} is down",
            description="Prometheus has failed to scrape job {{ $labels.job }} on "
            "{{ $labels.instance }} for 2 minutes: the process stopped or crashed, or its "
            "metrics port is unreachable.",
            runbook_anchor="instance_down",
        ),
        AlertRule(
            name="qpq_udp_receive_buffer_errors",
            group="qpq-health",
            expr=f"rate(node_netstat_Udp_RcvbufErrors{{{job_matcher('node')}}}[5m]) > 0",
            for_s=600,
            severity=Severity.WARNING,
            summary="UDP datagrams dropped for lack of receive buffer on {{ $labels.instance }}",
            description="The kernel drops {{ printf \"%.2f\" $value }} UDP datagrams/s on "
            "{{ $labels.instance }} because socket receive buffers are full "
            "(node_netstat_Udp_RcvbufErrors rising). QUIC loses packets and retransmits: the "
            "UDP buffer sysctls are missing. Check with `qpq-ops tune sysctl --check`.",
            runbook_anchor="udp_receive_buffer_errors",
        ),
        _cert_alert(Severity.WARNING, TLS_EXPIRY_WARNING_S),
        _cert_alert(Severity.CRITICAL, TLS_EXPIRY_CRITICAL_S),
        AlertRule(
            name="qpq_backup_stale",
            group="qpq-health",
            expr=f"time() - max by (instance) ({backup}) > {BACKUP_MAX_AGE_S}",
            for_s=0,
            severity=Severity.WARNING,
            summary="No successful backup of {{ $labels.instance }} in "
            f"{duration_text(BACKUP_MAX_AGE_S)}",
            description="The last successful `qpq-ops backup create` on {{ $labels.instance }} "
            "finished {{ humanizeDuration $value }} ago.",
            runbook_anchor="backup_stale",
            reason="too_old",
        ),
        AlertRule(
            # The same alert for a node whose node_exporter shows no backup metric at all.
            name="qpq_backup_stale",
            group="qpq-health",
            expr=f"max by (instance) (up{{{job_matcher('node')}}} == 1) "
            f"unless on (instance) max by (instance) ({backup})",
            for_s=3600,
            severity=Severity.WARNING,
            summary="No successful backup of {{ $labels.instance }} recorded",
            description="node_exporter on {{ $labels.instance }} has shown no "
            "qpq_backup_last_success_timestamp_seconds for an hour: no backup has ever "
            "succeeded there, or the textfile collector does not read the directory "
            "`qpq-ops backup create --textfile-dir` writes to.",
            runbook_anchor="backup_stale",
            reason="missing",
        ),
    )


HEALTH_ALERTS: tuple[AlertRule, ...] = health_alerts()
"""The health alerts with the default render settings."""


def all_alerts() -> tuple[AlertRule, ...]:
    return trigger_alerts() + health_alerts()


def _rule(alert: AlertRule) -> dict[str, object]:
    rule: dict[str, object] = {"alert": alert.name, "expr": alert.expr}
    if alert.for_s:
        rule["for"] = duration_text(alert.for_s)
    rule["labels"] = alert.labels
    rule["annotations"] = alert.annotations
    return rule


def render() -> RenderedFile:
    groups: dict[str, list[dict[str, object]]] = {}
    for alert in all_alerts():
        groups.setdefault(alert.group, []).append(_rule(alert))
    doc = {"groups": [{"name": name, "rules": rules} for name, rules in groups.items()]}
    return RenderedFile(PATH, yaml_document(doc, "qpq_ops/render/alerts.py"))
