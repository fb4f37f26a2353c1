"""promtool rule unit tests: `prometheus/tests/*.yml` (run by `promtool test rules`).

`qpq-triggers-test.yml` is built from `TRIGGERS`: per trigger, three instances whose
raw metrics (from `measure_series`) read below the warning threshold, between the
thresholds and beyond critical. The test checks the recorded trigger value, that no
alert fires before `for:` has passed, and that afterwards exactly the right warning
and critical alerts fire, with their full annotations. `qpq-health-test.yml` drives the
health alerts. Rendering fails when an alert rule has no test.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from qpq_ops.render._files import RenderedFile, yaml_document
from qpq_ops.render.alerts import (
    BACKUP_MAX_AGE_S,
    HEALTH_ALERTS,
    AlertRule,
    all_alerts,
    trigger_alert,
)
from qpq_ops.render.alerts import PATH as ALERTS_PATH
from qpq_ops.render.measure_series import STEP_S, InputSeries, series_for, window_seconds
from qpq_ops.render.recording_rules import PATH as RECORDING_PATH
from qpq_ops.render.recording_rules import trigger_record
from qpq_ops.render.selectors import NODE_JOB, QPQ_JOB
from qpq_ops.render.template_expand import expand
from qpq_ops.render.units import duration_text
from qpq_ops.triggers import TRIGGERS, Direction, Severity, Trigger

__all__ = [
    "BACKUP_PATH",
    "HEALTH_PATH",
    "TRIGGERS_PATH",
    "AlertCheck",
    "ExpectedAlert",
    "SampleCheck",
    "TestGroup",
    "backup_groups",
    "health_groups",
    "render",
    "trigger_group",
    "trigger_levels",
]

TRIGGERS_PATH = PurePosixPath("prometheus/tests/qpq-triggers-test.yml")
HEALTH_PATH = PurePosixPath("prometheus/tests/qpq-health-test.yml")
BACKUP_PATH = PurePosixPath("prometheus/tests/qpq-backup-test.yml")
"""Backups are tested over 27 hours; own file, evaluated every 5 minutes to stay fast."""
BACKUP_EVALUATION_S = 300


@dataclass(frozen=True)
class ExpectedAlert:
    labels: tuple[tuple[str, str], ...]
    annotations: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class AlertCheck:
    eval_s: int
    alertname: str
    alerts: tuple[ExpectedAlert, ...] = ()


@dataclass(frozen=True)
class SampleCheck:
    eval_s: int
    expr: str
    samples: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class TestGroup:
    name: str
    interval_s: int
    samples: int
    series: tuple[InputSeries, ...]
    alert_checks: tuple[AlertCheck, ...]
    sample_checks: tuple[SampleCheck, ...] = field(default=())


def _fired(alert: AlertRule, labels: Mapping[str, str], value: float) -> ExpectedAlert:
    """The alert as promtool shows it: series labels + rule labels, expanded text."""
    all_labels = {**labels, **alert.labels}
    annotations = {k: expand(v, all_labels, value) for k, v in alert.annotations.items()}
    return ExpectedAlert(tuple(sorted(all_labels.items())), tuple(annotations.items()))


def trigger_levels(trigger: Trigger) -> dict[str, float]:
    """Values for the three test instances: ok, warning only, critical (and warning)."""
    w, c = trigger.warning, trigger.critical
    if trigger.direction is Direction.ABOVE:
        crit = (c + 100) / 2 if trigger.unit == "percent" else c * 1.5
        return {"ok": w / 2, "warning": (w + c) / 2, "critical": crit}
    return {"ok": w * 2 if w > 0 else w + 1, "warning": (w + c) / 2, "critical": c / 2}


def _minutes_ceil(seconds: int) -> int:
    return -(-seconds // 60) * 60


def trigger_group(trigger: Trigger) -> TestGroup:
    levels = trigger_levels(trigger)
    instances = {f"{trigger.id}-{name}": value for name, value in levels.items()}
    series = tuple(s for inst, value in instances.items()
                   for s in series_for(trigger, inst, value))
    # Rate windows are full from `window` on; `for:` then runs; 2 minutes of margin.
    fire_s = _minutes_ceil(window_seconds(trigger.measure)) + trigger.alert_for_s + 120
    samples = (fire_s + 60) // STEP_S + 1
    checks: list[AlertCheck] = []
    if trigger.alert_for_s >= 60:
        # Every instance already reads its level, but `for:` has not passed yet.
        early = trigger.alert_for_s - 60
        checks += [AlertCheck(early, trigger_alert(trigger, sev).name) for sev in Severity]
    for severity in (Severity.WARNING, Severity.CRITICAL):
        alert = trigger_alert(trigger, severity)
        firing = tuple(
            _fired(alert, {"instance": inst}, value)
            for inst, value in sorted(instances.items())
            if trigger.state_for(value) in _AT_LEAST[severity]
        )
        checks.append(AlertCheck(fire_s, alert.name, firing))
    record = trigger_record(trigger)
    # Rounded to 1e-6: the quantile interpolation is exact only up to float noise.
    sample_check = SampleCheck(
        fire_s, f"round({record}, 0.000001)",
        tuple((f'{{instance="{inst}"}}', round(value, 6))
              for inst, value in sorted(instances.items())),
    )
    return TestGroup(f"trigger {trigger.id}", STEP_S, samples, series, tuple(checks),
                     (sample_check,))


_AT_LEAST = {
    Severity.WARNING: {"warning", "critical"},
    Severity.CRITICAL: {"critical"},
}


def _health(name: str, reason: str | None = None) -> AlertRule:
    for alert in HEALTH_ALERTS:
        if alert.name == name and alert.reason == reason:
            return alert
    raise KeyError(name)


def _series(metric: str, labels: Mapping[str, str], start: float, step: float) -> InputSeries:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return InputSeries(f"{metric}{{{inner}}}", start, step)


def _instance_down() -> TestGroup:
    alert = _health("qpq_instance_down")
    up_qpq = {"instance": "n1", "job": QPQ_JOB}
    # n1's qpq server answers for 4 minutes, then stops; its node_exporter stays up.
    series = (
        InputSeries('up{instance="n1",job="qpq"}', 1, 0, literal="1x3 0x11"),
        _series("up", {"instance": "n1", "job": NODE_JOB}, 1, 0),
    )
    return TestGroup(
        "health instance down", 60, 16, series,
        (
            AlertCheck(300, alert.name),
            AlertCheck(480, alert.name, (_fired(alert, up_qpq, 0),)),
        ),
    )


def _udp_errors() -> TestGroup:
    alert = _health("qpq_udp_receive_buffer_errors")
    series = (
        _series("node_netstat_Udp_RcvbufErrors", {"instance": "n1", "job": NODE_JOB}, 0, 30),
        _series("node_netstat_Udp_RcvbufErrors", {"instance": "n2", "job": NODE_JOB}, 0, 0),
    )
    return TestGroup(
        "health udp receive buffer errors", 60, 21, series,
        (
            AlertCheck(300, alert.name),
            AlertCheck(900, alert.name,
                       (_fired(alert, {"instance": "n1", "job": NODE_JOB}, 0.5),)),
        ),
    )


def _tls_expiry() -> TestGroup:
    now = 1200
    expiries = {"cert-fresh": 30 * 86400, "cert-soon": 7 * 86400, "cert-urgent": 86400}
    series = tuple(
        _series("qpq_tls_cert_expiry_timestamp_seconds", {"instance": i, "job": QPQ_JOB}, v, 0)
        for i, v in expiries.items()
    )
    checks: list[AlertCheck] = []
    for severity in Severity:
        alert = _health(f"qpq_tls_cert_expiry_{severity}")
        checks.append(AlertCheck(300, alert.name))
        fired = tuple(
            _fired(alert, {"instance": i, "job": QPQ_JOB}, v - now)
            for i, v in sorted(expiries.items())
            if v - now < (86400 * (14 if severity is Severity.WARNING else 3))
        )
        checks.append(AlertCheck(now, alert.name, fired))
    return TestGroup("health tls certificate expiry", 60, 31, series, tuple(checks))


def _backup() -> TestGroup:
    too_old = _health("qpq_backup_stale", "too_old")
    missing = _health("qpq_backup_stale", "missing")
    hour, step = 3600, 300  # samples 5 min apart: within the 5 min lookback, no gaps
    node = {"job": NODE_JOB}
    series = (
        *(_series("up", {"instance": i, **node}, 1, 0) for i in ("fresh", "stale", "never")),
        # fresh: a backup before every scrape (the timestamp is the sample's time);
        # stale: one backup at time 0, none since.
        _series("qpq_backup_last_success_timestamp_seconds", {"instance": "fresh", **node},
                0, step),
        _series("qpq_backup_last_success_timestamp_seconds", {"instance": "stale", **node},
                0, 0),
    )
    before, after = BACKUP_MAX_AGE_S - hour, BACKUP_MAX_AGE_S + hour
    return TestGroup(
        "health stale backup", step, (after + hour) // step, series,
        (
            # "never" has no backup metric, but `for: 1h` has not passed yet.
            AlertCheck(0, too_old.name),
            AlertCheck(before, too_old.name,
                       (_fired(missing, {"instance": "never"}, 1),)),
            AlertCheck(after, too_old.name,
                       (_fired(missing, {"instance": "never"}, 1),
                        _fired(too_old, {"instance": "stale"}, after))),
        ),
    )


def health_groups() -> tuple[TestGroup, ...]:
    return (_instance_down(), _udp_errors(), _tls_expiry())


def backup_groups() -> tuple[TestGroup, ...]:
    return (_backup(),)


def _series_doc(group: TestGroup) -> list[dict[str, str]]:
    return [{"series": s.series, "values": s.values(group.samples)} for s in group.series]


def _group_doc(group: TestGroup) -> dict[str, object]:
    doc: dict[str, object] = {
        "name": group.name,
        "interval": duration_text(group.interval_s),
        "input_series": _series_doc(group),
    }
    if group.sample_checks:
        doc["promql_expr_test"] = [
            {
                "expr": check.expr,
                "eval_time": duration_text(check.eval_s),
                "exp_samples": [{"labels": labels, "value": _round(value)}
                                for labels, value in check.samples],
            }
            for check in group.sample_checks
        ]
    doc["alert_rule_test"] = [
        {
            "eval_time": duration_text(check.eval_s),
            "alertname": check.alertname,
            "exp_alerts": [
                {"exp_labels": dict(alert.labels), "exp_annotations": dict(alert.annotations)}
                for alert in check.alerts
            ],
        }
        for check in group.alert_checks
    ]
    return doc


def _round(value: float) -> float | int:
    value = float(f"{value:.12g}")
    return int(value) if value.is_integer() else value


def _rule_files() -> list[str]:
    return [f"../{RECORDING_PATH.relative_to('prometheus')}",
            f"../{ALERTS_PATH.relative_to('prometheus')}"]


def _test_file(path: PurePosixPath, groups: tuple[TestGroup, ...],
               evaluation_s: int = 60) -> RenderedFile:
    doc = {
        "rule_files": _rule_files(),
        "evaluation_interval": duration_text(evaluation_s),
        "tests": [_group_doc(g) for g in groups],
    }
    return RenderedFile(path, yaml_document(doc, "qpq_ops/render/rules_tests.py"))


def _check_coverage(groups: tuple[TestGroup, ...]) -> None:
    """Every alert rule must fire in some test (a new alert without a test fails)."""
    fired = {(dict(a.labels).get("alertname", check.alertname), dict(a.labels).get("reason"))
             for g in groups for check in g.alert_checks for a in check.alerts}
    for alert in all_alerts():
        if (alert.name, alert.reason) not in fired:
            raise ValueError(f"alert {alert.name} ({alert.reason or 'any'}) fires in no "
                             "promtool test: add a scenario to qpq_ops/render/rules_tests.py")


def render() -> tuple[RenderedFile, ...]:
    trigger_groups = tuple(trigger_group(t) for t in TRIGGERS)
    health, backup = health_groups(), backup_groups()
    _check_coverage(trigger_groups + health + backup)
    return (_test_file(TRIGGERS_PATH, trigger_groups), _test_file(HEALTH_PATH, health),
            _test_file(BACKUP_PATH, backup, BACKUP_EVALUATION_S))
