"""promtool rule unit tests: `prometheus/tests/*.yml` (run by `promtool test rules`).

`qpq-triggers-test.yml` is built from `TRIGGERS`: per trigger and per scrape interval
(15 s and Prometheus's default 1 m), instances whose raw metrics (from `measure_series`)
read ok, exactly at each threshold (not beyond it: `>` is strict), just above each
threshold, between the thresholds across a counter reset, and beyond critical, plus a
critical-looking instance of a foreign scrape job that must be ignored. The test checks
the recorded trigger value, that no alert fires before `for:` has passed, and that
afterwards exactly the right warning and critical alerts fire, with their full
annotations; a `>` turned into `>=` fails it. `qpq-health-test.yml` drives the
health alerts. Rendering fails when an alert rule has no test.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from qpq_ops.render._files import RenderedFile, yaml_document
from qpq_ops.render.alerts import PATH as ALERTS_PATH
from qpq_ops.render.alerts import (
    AlertRule,
    all_alerts,
    health_alerts,
    trigger_alert,
)
from qpq_ops.render.measure_series import (
    SCRAPE_INTERVALS_S,
    STEP_S,
    InputSeries,
    series_for,
    window_seconds,
    window_seconds_of,
)
from qpq_ops.render.recording_rules import PATH as RECORDING_PATH
from qpq_ops.render.recording_rules import trigger_record
from qpq_ops.render.settings import current
from qpq_ops.render.template_expand import expand
from qpq_ops.render.units import duration_text
from qpq_ops.triggers import (
    BACKUP_MAX_AGE_S,
    TLS_EXPIRY_CRITICAL_S,
    TLS_EXPIRY_WARNING_S,
    TRIGGERS,
    Direction,
    FederationPeers,
    PerMinute,
    Severity,
    State,
    Trigger,
)

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
    """Values of the test instances by name: ok, at and just beyond each threshold,
    between the thresholds (`warning`) and well beyond critical."""
    w, c = trigger.warning, trigger.critical
    if trigger.unit == "level":
        # discrete levels: nothing lies between or just beyond them
        return {"ok": w, "warning": c, "critical": c + 1}
    sign = 1 if trigger.direction is Direction.ABOVE else -1

    def just_beyond(x: float) -> float:
        nudge = {"percent": 0.5, "messages": 1.0, "per_minute": 1.0}.get(trigger.unit,
                                                                         abs(x) * 0.02)
        return x + sign * nudge

    if trigger.direction is Direction.ABOVE:
        crit = (c + 100) / 2 if trigger.unit == "percent" else c * 1.5
        ok = w / 2
    else:
        crit, ok = c / 2, (w * 2 if w > 0 else w + 1)
    return {"ok": ok, "at-warning": w, "above-warning": just_beyond(w),
            "warning": (w + c) / 2, "at-critical": c, "above-critical": just_beyond(c),
            "critical": crit}


def _minutes_ceil(seconds: int) -> int:
    return -(-seconds // 60) * 60


FOREIGN_JOB = "other-team"
"""A job the rules must never read (another team's exporter in the same Prometheus)."""


def trigger_group(trigger: Trigger, step_s: int = STEP_S) -> TestGroup:
    levels = trigger_levels(trigger)
    instances = {f"{trigger.id}-{name}": value for name, value in levels.items()}
    window = window_seconds(trigger.measure)
    # Rate windows are full from `window` on; `for:` then runs; 2 minutes of margin.
    fire_s = _minutes_ceil(window) + trigger.alert_for_s + 120
    samples = (fire_s + 60) // step_s + 1
    reset_at = (fire_s - window // 2) // step_s  # inside the window the alert reads
    series: list[InputSeries] = []
    for inst, value in instances.items():
        reset = reset_at if (inst == f"{trigger.id}-warning"
                             and isinstance(trigger.measure, PerMinute)) else None
        exact = fire_s // step_s if inst.startswith(f"{trigger.id}-at-") else None
        series += series_for(trigger, inst, value, step_s, reset_at=reset, exact_at=exact)
    series += series_for(trigger, f"{trigger.id}-foreign", levels["critical"], step_s,
                         job=FOREIGN_JOB)
    checks: list[AlertCheck] = []
    if trigger.alert_for_s >= 60:
        # Every instance already reads its level, but `for:` has not passed yet.
        early = trigger.alert_for_s - 60
        checks += [AlertCheck(early, trigger_alert(trigger, sev).name) for sev in Severity]
    if isinstance(trigger.measure, FederationPeers):
        checks += _federation_early(trigger, instances)
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
    return TestGroup(f"trigger {trigger.id} scraped every {duration_text(step_s)}", step_s,
                     samples, tuple(series), tuple(checks), (sample_check,))


def _federation_early(trigger: Trigger, instances: dict[str, float]) -> list[AlertCheck]:
    """Both conditions hold from the first sample: a minute before the down window
    nothing fires; a minute after it the unreachable peer fires both alerts, but the
    growing queue stays quiet until its own window has passed."""
    assert isinstance(trigger.measure, FederationPeers)
    down_s = window_seconds_of(trigger.measure.down_window)
    checks = [AlertCheck(down_s - 60, trigger_alert(trigger, sev).name) for sev in Severity]
    down = [(inst, v) for inst, v in sorted(instances.items())
            if trigger.state_for(v) is State.CRITICAL]
    for severity in Severity:
        alert = trigger_alert(trigger, severity)
        checks.append(AlertCheck(down_s + 60, alert.name, tuple(
            _fired(alert, {"instance": inst}, v) for inst, v in down)))
    return checks


_AT_LEAST = {
    Severity.WARNING: {"warning", "critical"},
    Severity.CRITICAL: {"critical"},
}


def _health(name: str, reason: str | None = None) -> AlertRule:
    for alert in health_alerts():
        if alert.name == name and alert.reason == reason:
            return alert
    raise KeyError(name)


def _series(metric: str, labels: Mapping[str, str], start: float, step: float,
            literal: str | None = None) -> InputSeries:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return InputSeries(f"{metric}{{{inner}}}", start, step, literal=literal)


def _instance_down() -> TestGroup:
    alert = _health("qpq_instance_down")
    up_qpq = {"instance": "n1", "job": current().scope.qpq_job}
    # n1's qpq server answers for 4 minutes, then stops; its node_exporter stays up.
    series = (
        _series("up", up_qpq, 1, 0, literal="1x3 0x11"),
        _series("up", {"instance": "n1", "job": current().scope.node_job}, 1, 0),
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
    node = current().scope.node_job
    series = (
        _series("node_netstat_Udp_RcvbufErrors", {"instance": "n1", "job": node}, 0, 30),
        _series("node_netstat_Udp_RcvbufErrors", {"instance": "n2", "job": node}, 0, 0),
    )
    return TestGroup(
        "health udp receive buffer errors", 60, 21, series,
        (
            AlertCheck(300, alert.name),
            AlertCheck(900, alert.name,
                       (_fired(alert, {"instance": "n1", "job": node}, 0.5),)),
        ),
    )


def _tls_expiry() -> TestGroup:
    now = 1200
    qpq = current().scope.qpq_job
    expiries = {"cert-fresh": 30 * 86400, "cert-soon": 7 * 86400, "cert-urgent": 86400}
    series = tuple(
        _series("qpq_tls_cert_expiry_timestamp_seconds", {"instance": i, "job": qpq}, v, 0)
        for i, v in expiries.items()
    )
    checks: list[AlertCheck] = []
    for severity in Severity:
        alert = _health(f"qpq_tls_cert_expiry_{severity}")
        checks.append(AlertCheck(300, alert.name))
        fired = tuple(
            _fired(alert, {"instance": i, "job": qpq}, v - now)
            for i, v in sorted(expiries.items())
            if v - now < (TLS_EXPIRY_WARNING_S if severity is Severity.WARNING
                          else TLS_EXPIRY_CRITICAL_S)
        )
        checks.append(AlertCheck(now, alert.name, fired))
    return TestGroup("health tls certificate expiry", 60, 31, series, tuple(checks))


def _backup() -> TestGroup:
    too_old = _health("qpq_backup_stale", "too_old")
    missing = _health("qpq_backup_stale", "missing")
    hour, step = 3600, 300  # samples 5 min apart: within the 5 min lookback, no gaps
    node = {"job": current().scope.node_job}
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
        # Alerts read recording rules of another group: without a fixed order promtool
        # may evaluate an alert before the rule it reads at the same instant, and a
        # boundary case (a value exactly at its line) then passes or fails by chance.
        "group_eval_order": ["qpq-recording", "qpq-triggers", "qpq-health"],
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
    trigger_groups = tuple(trigger_group(t, step) for t in TRIGGERS
                           for step in SCRAPE_INTERVALS_S)
    health, backup = health_groups(), backup_groups()
    _check_coverage(trigger_groups + health + backup)
    return (_test_file(TRIGGERS_PATH, trigger_groups), _test_file(HEALTH_PATH, health),
            _test_file(BACKUP_PATH, backup, BACKUP_EVALUATION_S))
