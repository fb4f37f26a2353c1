"""The metrics qpq exports, as data, read from the server's own metric registry.

`qpq_server.metrics.ServerMetrics` is the one place a server metric is declared; this
module builds it on a throwaway registry and reads each family's name, type, help and
label names, so the catalogue cannot drift from what the server exports. Only the
backup textfile metrics, written by `qpq-ops backup create`, are listed here.

Used for the generated metrics table in `docs/operations/monitoring.md` and by the
metric-contract test, which scrapes a real server and node_exporter and fails when a
name or label listed here, or named by an alert, recording rule or dashboard panel, is
missing.
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


def _server_metrics() -> tuple[MetricSpec, ...]:
    """Every metric `ServerMetrics` declares, in declaration order."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from qpq_server.metrics import ServerMetrics

    specs = []
    for wrapper in vars(ServerMetrics(CollectorRegistry())).values():
        if not isinstance(wrapper, MetricWrapperBase):
            continue
        (family,) = wrapper.describe()
        kind = MetricType(family.type)
        # counters are named as scraped and queried, with their `_total`
        name = f"{family.name}_total" if kind is MetricType.COUNTER else family.name
        # prometheus_client keeps a family's label names on the wrapper only
        labels = tuple(getattr(wrapper, "_labelnames", ()))
        specs.append(MetricSpec(name, kind, family.documentation, labels))
    return tuple(specs)


_BACKUP_TEXTFILE: tuple[MetricSpec, ...] = (
    MetricSpec("qpq_backup_last_success_timestamp_seconds", MetricType.GAUGE,
               "End time of the last successful `qpq-ops backup create`",
               source=MetricSource.BACKUP_TEXTFILE),
    MetricSpec("qpq_backup_last_size_bytes", MetricType.GAUGE,
               "Size of the last successful backup archive",
               source=MetricSource.BACKUP_TEXTFILE),
    MetricSpec("qpq_backup_last_duration_seconds", MetricType.GAUGE,
               "Wall time of the last successful backup",
               source=MetricSource.BACKUP_TEXTFILE),
)

METRICS: tuple[MetricSpec, ...] = _server_metrics() + _BACKUP_TEXTFILE

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
