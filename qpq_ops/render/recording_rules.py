"""Recording rules: `prometheus/rules/qpq-recording.yml`.

One recorded series per scaling trigger (its value per instance, which the alert rules
compare and the dashboard plots against the same thresholds), plus the rates and
latency quantiles the dashboard draws. Every expression is computed once per
evaluation instead of once per panel refresh and alert.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from qpq_ops.render._files import RenderedFile, yaml_document
from qpq_ops.render.selectors import RATE_WINDOW, job_matcher
from qpq_ops.render.settings import current
from qpq_ops.triggers import (
    TRIGGERS,
    BusyPercent,
    FederationPeers,
    Gauge,
    Measure,
    PerMinute,
    ProcessBusyPercent,
    Quantile,
    RatioPercent,
    Trigger,
    UsedPercent,
)

__all__ = [
    "PATH",
    "QUANTILES",
    "RecordingRule",
    "latency_record",
    "rate_record",
    "recording_rules",
    "render",
    "trigger_record",
]

PATH = PurePosixPath("prometheus/rules/qpq-recording.yml")

QUANTILES: tuple[tuple[str, float], ...] = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))

# Counters the dashboard shows as per-second rates, with the labels kept beside instance.
_RATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qpq_enqueue_total", ()),
    ("qpq_fetch_total", ()),
    ("qpq_auth_login_success_total", ()),
    ("qpq_auth_login_failure_total", ()),
    ("qpq_rate_limit_hit_total", ()),
    ("qpq_rpc_errors_total", ("op", "code")),
    # requests served per op: the R of RED (every request is observed once)
    ("qpq_rpc_duration_seconds_count", ("op",)),
    ("qpq_connections_refused_total", ("reason",)),
    ("qpq_federation_relay_total", ("peer", "result")),
)

# Histograms the dashboard shows as p50/p95/p99, with the labels kept beside instance.
_LATENCIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qpq_tls_handshake_duration_seconds", ()),
    ("qpq_rpc_duration_seconds", ("op",)),
    ("qpq_db_write_duration_seconds", ()),
)


@dataclass(frozen=True)
class RecordingRule:
    record: str
    expr: str


def _level(extra: tuple[str, ...]) -> str:
    return "_".join(("instance", *extra))


def _operations(measure: Measure) -> str:
    """The `operations` part of a record name, window included."""
    window = f"rate{getattr(measure, 'window', '')}"
    if isinstance(measure, Gauge):
        return "sum"
    if isinstance(measure, PerMinute):
        return f"per_minute_increase{measure.window}"
    if isinstance(measure, Quantile):
        return f"p{round(measure.q * 100)}_{window}"
    if isinstance(measure, RatioPercent):
        return "percent"
    if isinstance(measure, UsedPercent):
        return "used_percent"
    if isinstance(measure, BusyPercent):
        return f"busy_percent_{window}"
    if isinstance(measure, ProcessBusyPercent):
        return f"max_busy_percent_{window}"
    if isinstance(measure, FederationPeers):
        return "worst_peer_level"
    raise NotImplementedError(f"no record name for measure {type(measure).__name__}")


def trigger_record(trigger: Trigger) -> str:
    """`level:metric:operations` of a trigger's value, e.g.
    `instance:qpq_trigger_cpu:busy_percent_rate5m`."""
    return f"instance:qpq_trigger_{trigger.id}:{_operations(trigger.measure)}"


def rate_record(counter: str, extra: tuple[str, ...] = ()) -> str:
    """`qpq_fetch_total` -> `instance:qpq_fetch:rate5m`."""
    base = counter.removesuffix("_total")
    return f"{_level(extra)}:{base}:rate{RATE_WINDOW}"


def latency_record(histogram: str, quantile_name: str, extra: tuple[str, ...] = ()) -> str:
    """`qpq_rpc_duration_seconds`, p95, (op,) ->
    `instance_op:qpq_rpc_duration_seconds:p95_rate5m`."""
    return f"{_level(extra)}:{histogram}:{quantile_name}_rate{RATE_WINDOW}"


def _by(extra: tuple[str, ...], *more: str) -> str:
    return ", ".join(("instance", *extra, *more))


def recording_rules() -> tuple[RecordingRule, ...]:
    # The trigger's own expression, verbatim: the value alerts compare is the value
    # `qpq-ops check-triggers` reports (one series per instance by the Trigger contract).
    scope = current().scope
    rules = [RecordingRule(trigger_record(t), t.expr_in(scope)) for t in TRIGGERS]
    qpq = job_matcher("qpq")
    for counter, extra in _RATES:
        rules.append(RecordingRule(
            rate_record(counter, extra),
            f"sum by ({_by(extra)}) (rate({counter}{{{qpq}}}[{RATE_WINDOW}]))",
        ))
    for histogram, extra in _LATENCIES:
        for name, q in QUANTILES:
            rules.append(RecordingRule(
                latency_record(histogram, name, extra),
                f"histogram_quantile({q}, sum by ({_by(extra, 'le')}) "
                f"(rate({histogram}_bucket{{{qpq}}}[{RATE_WINDOW}])))",
            ))
    return tuple(rules)


def render() -> RenderedFile:
    doc = {
        "groups": [
            {
                "name": "qpq-recording",
                "rules": [{"record": r.record, "expr": r.expr} for r in recording_rules()],
            }
        ]
    }
    return RenderedFile(PATH, yaml_document(doc, "qpq_ops/render/recording_rules.py"))
