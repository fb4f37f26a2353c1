"""The metrics qpq exports, as data (DESIGN.md's metrics table).

Used for the generated metrics table in `docs/operations/monitoring.md` and by the
metric-contract test, which scrapes a real server and node_exporter and fails when a
name listed here, or named by an alert, recording rule or dashboard panel, is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "METRICS",
    "MetricSource",
    "MetricSpec",
    "MetricType",
    "metric_by_name",
    "sample_names",
]


class MetricType(StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


class MetricSource(StrEnum):
    """Who exports the metric."""

    SERVER = "qpq-server"
    """The server's `/metrics` endpoint (`[metrics] listen`)."""
    BACKUP_TEXTFILE = "backup textfile"
    """`qpq-ops backup create` writes it to node_exporter's textfile collector dir."""


@dataclass(frozen=True)
class MetricSpec:
    name: str
    """Family name as in DESIGN.md (counters keep their `_total`)."""
    type: MetricType
    help: str
    labels: tuple[str, ...] = ()
    source: MetricSource = MetricSource.SERVER


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("qpq_enqueue_total", MetricType.COUNTER,
               "messages accepted into delivery queues"),
    MetricSpec("qpq_fetch_total", MetricType.COUNTER, "fetch calls served"),
    MetricSpec("qpq_delivery_queue_depth", MetricType.GAUGE,
               "messages waiting for delivery, all queues"),
    MetricSpec("qpq_delivery_waiters", MetricType.GAUGE, "parked long-poll fetches"),
    MetricSpec("qpq_rate_limit_hit_total", MetricType.COUNTER,
               "requests refused by the rate limiter"),
    MetricSpec("qpq_auth_login_failure_total", MetricType.COUNTER,
               "failed logins (bad password, unknown user, bad token)"),
    MetricSpec("qpq_auth_login_success_total", MetricType.COUNTER, "successful logins"),
    MetricSpec("qpq_connections_active", MetricType.GAUGE, "open QUIC connections"),
    MetricSpec("qpq_connections_max", MetricType.GAUGE,
               "configured connection cap (triggers compare the two)"),
    MetricSpec("qpq_connections_refused_total", MetricType.COUNTER,
               "connections refused (cap reached, handshake flood, draining); "
               "beyond DESIGN.md's table", labels=("reason",)),
    MetricSpec("qpq_sessions_active", MetricType.GAUGE, "live sessions"),
    MetricSpec("qpq_tls_handshake_duration_seconds", MetricType.HISTOGRAM,
               "QUIC/TLS handshake time"),
    MetricSpec("qpq_rpc_duration_seconds", MetricType.HISTOGRAM,
               "request handling time per operation", labels=("op",)),
    MetricSpec("qpq_rpc_errors_total", MetricType.COUNTER,
               "requests answered with an error", labels=("op", "code")),
    MetricSpec("qpq_db_write_duration_seconds", MetricType.HISTOGRAM,
               "storage commit latency (the disk I/O latency trigger)"),
    MetricSpec("qpq_blob_bytes", MetricType.GAUGE, "bytes held in blob storage"),
    MetricSpec("qpq_kt_log_size", MetricType.GAUGE, "leaves in the key-transparency log"),
    MetricSpec("qpq_key_packages_low_total", MetricType.COUNTER,
               "key fetches that left the user with fewer than 5 one-time key packages "
               "(senders then use the signed prekey); beyond DESIGN.md's table"),
    MetricSpec("qpq_federation_relay_total", MetricType.COUNTER,
               "messages relayed to/from peers", labels=("peer", "result")),
    MetricSpec("qpq_tls_cert_expiry_timestamp_seconds", MetricType.GAUGE,
               "notAfter of the serving TLS certificate"),
    MetricSpec("qpq_backup_last_success_timestamp_seconds", MetricType.GAUGE,
               "end time of the last successful `qpq-ops backup create`",
               source=MetricSource.BACKUP_TEXTFILE),
    MetricSpec("qpq_backup_last_size_bytes", MetricType.GAUGE,
               "size of the last successful backup archive",
               source=MetricSource.BACKUP_TEXTFILE),
    MetricSpec("qpq_backup_last_duration_seconds", MetricType.GAUGE,
               "wall time of the last successful backup",
               source=MetricSource.BACKUP_TEXTFILE),
)

_BY_NAME = {spec.name: spec for spec in METRICS}


def metric_by_name(name: str) -> MetricSpec:
    """The catalogue entry for a family name; KeyError names the unknown metric."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"metric {name!r} is not in qpq_ops.metrics_catalog") from None


def sample_names(spec: MetricSpec) -> tuple[str, ...]:
    """The sample names a scrape shows for this family (histograms split in three)."""
    if spec.type is MetricType.HISTOGRAM:
        return (f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count")
    return (spec.name,)
