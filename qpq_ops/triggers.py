"""The scaling triggers (the guide's nine plus qpq's process_cpu and federation), defined
once as data.

Alert rules, dashboard thresholds, the docs table and `qpq-ops check-triggers` are all
generated from `TRIGGERS`; change a threshold here and every consumer follows.

Each trigger measures one value per `instance` through a `Measure`: a small typed recipe
that renders the trigger's PromQL (`Trigger.expr`) and that the direct-scrape evaluator
(`qpq_ops.evaluate.direct`) computes from two scrapes of a `/metrics` page, so the
Prometheus and the direct path cannot disagree about what is measured.

The module checks itself at import: ids unique and equal to DESIGN.md's list, critical
stricter than warning in the trigger's direction, `alert_for_s >= sustain_s`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from qpq_ops.exit_codes import ExitCode, severity

__all__ = [
    "BACKUP_CRITICAL_AGE_S",
    "BACKUP_MAX_AGE_S",
    "DEFAULT_SCOPE",
    "FEDERATION_DOWN_WINDOW",
    "FEDERATION_GROWTH_WINDOW",
    "RATE_WINDOW",
    "RUNBOOK_DOC",
    "TLS_EXPIRY_CRITICAL_S",
    "TLS_EXPIRY_WARNING_S",
    "TRIGGERS",
    "TRIGGER_IDS",
    "BusyPercent",
    "Direction",
    "FederationPeers",
    "Gauge",
    "Measure",
    "PerMinute",
    "ProcessBusyPercent",
    "Quantile",
    "RatioPercent",
    "Scope",
    "Severity",
    "Source",
    "State",
    "Trigger",
    "UsedPercent",
    "get_trigger",
    "validate_triggers",
    "worst_state",
]

RUNBOOK_DOC = "docs/operations/incident-response.md"

# The ids fixed by DESIGN.md, in the scaling guide's order.
TRIGGER_IDS: tuple[str, ...] = (
    "cpu",
    "memory",
    "disk_usage",
    "disk_io_latency",
    "delivery_queue_depth",
    "rate_limit_hits",
    "login_failures",
    "connections",
    "tls_handshake_latency",
    "process_cpu",
    "federation",
)

# Health thresholds that are not scaling triggers; the alert rules, the dashboard, the
# runbooks and `qpq-ops doctor` all read these (one place, so they cannot disagree).
TLS_EXPIRY_WARNING_S = 14 * 86400
"""Warn when the serving certificate expires within 14 days (time to rotate calmly)."""
TLS_EXPIRY_CRITICAL_S = 3 * 86400
"""Critical within 3 days: clients refuse an expired certificate."""
BACKUP_MAX_AGE_S = 26 * 3600
"""A daily backup plus two hours of slack (the stale-backup alert, doctor's warning)."""
BACKUP_CRITICAL_AGE_S = 72 * 3600
"""Three days without a backup: doctor says critical."""

RATE_WINDOW = "5m"
"""Range of every rate(): at least four scrape intervals up to a 75 s scrape interval,
so Prometheus's default 1 m interval still yields a value (a 1 m window goes absent)."""


class Severity(StrEnum):
    WARNING = "warning"
    CRITICAL = "critical"


class State(StrEnum):
    OK = "ok"
    WARNING = "warning"
    CRITICAL = "critical"
    NO_DATA = "no-data"

    @property
    def exit_code(self) -> ExitCode:
        return _STATE_EXIT[self]


_STATE_EXIT = {State.OK: ExitCode.OK, State.WARNING: ExitCode.WARNING,
               State.CRITICAL: ExitCode.CRITICAL, State.NO_DATA: ExitCode.CANNOT_EVALUATE}


class Direction(StrEnum):
    """Which side of the thresholds is bad."""

    ABOVE = "above"
    BELOW = "below"


class Source(StrEnum):
    """Who exports the trigger's metrics."""

    NODE = "node_exporter"
    QPQ = "qpq"


@dataclass(frozen=True)
class Scope:
    """Which series the triggers read: the scrape job of each source, and the filesystem
    that holds the data dir. A node_exporter of another team's host in the same
    Prometheus (another job) is never read; a full `/boot/efi` is not the data volume."""

    qpq_job: str = "qpq"
    node_job: str = "node"
    mountpoint: str = "/"

    def job(self, source: Source) -> str:
        return self.node_job if source is Source.NODE else self.qpq_job


DEFAULT_SCOPE = Scope()


def worst_state(states: list[State] | tuple[State, ...]) -> State:
    """The worst by `qpq_ops.exit_codes.severity`: critical > warning > no-data > ok; an
    empty list is no-data (nothing evaluated)."""
    if not states:
        return State.NO_DATA
    return max(states, key=lambda s: severity(s.exit_code))


# --- selectors -----------------------------------------------------------------------------

_MATCHER_LIST = re.compile(r"^\{?(?P<inner>.*?)\}?$", re.S)


def _inner_matchers(selector: str) -> str:
    """'{instance="a:9090"}' or 'instance="a:9090"' -> 'instance="a:9090"'."""
    match = _MATCHER_LIST.match(selector.strip())
    inner = match.group("inner").strip() if match else ""
    return inner.rstrip(",").strip()


def _select(metric: str, fixed: str, extra: str) -> str:
    """A vector selector: metric{fixed,extra} with empty parts left out."""
    parts = [p for p in (fixed, extra) if p]
    return f"{metric}{{{','.join(parts)}}}" if parts else metric


def _window_s(window: str) -> int:
    """'5m' -> 300."""
    match = re.fullmatch(r"(\d+)([smh])", window)
    if match is None:
        raise ValueError(f"unsupported window {window!r}")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


# --- measures: what a trigger computes, rendered to PromQL or computed from scrapes -------


@dataclass(frozen=True)
class Gauge:
    """A gauge summed per instance (e.g. messages waiting in all delivery queues)."""

    metric: str

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.metric,)

    def promql(self, extra: str = "") -> str:
        return f"sum by (instance) ({_select(self.metric, '', extra)})"


@dataclass(frozen=True)
class PerMinute:
    """A counter's increase per minute, averaged over `window`."""

    counter: str
    window: str = RATE_WINDOW

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.counter,)

    def promql(self, extra: str = "") -> str:
        # increase / minutes rather than 60 * rate: the same value, but exact in float64
        # for whole-number increases (so "at the threshold" is not one ulp above it)
        sel = _select(self.counter, "", extra)
        minutes = _window_s(self.window) / 60
        return f"sum by (instance) (increase({sel}[{self.window}])) / {_fmt(minutes)}"


@dataclass(frozen=True)
class Quantile:
    """A quantile (e.g. p95) of a histogram's observations over `window`."""

    histogram: str
    q: float
    window: str = RATE_WINDOW

    @property
    def metrics(self) -> tuple[str, ...]:
        return (f"{self.histogram}_bucket",)

    def promql(self, extra: str = "") -> str:
        sel = _select(f"{self.histogram}_bucket", "", extra)
        return (
            f"histogram_quantile({self.q}, "
            f"sum by (instance, le) (rate({sel}[{self.window}])))"
        )


@dataclass(frozen=True)
class RatioPercent:
    """100 x numerator / denominator, both gauges summed per instance."""

    numerator: str
    denominator: str

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.numerator, self.denominator)

    def promql(self, extra: str = "") -> str:
        num = _select(self.numerator, "", extra)
        den = _select(self.denominator, "", extra)
        return f"100 * sum by (instance) ({num}) / sum by (instance) ({den})"


@dataclass(frozen=True)
class UsedPercent:
    """100 x (1 - available / total): memory or filesystem space in use.

    `matchers` restricts the series (e.g. real filesystems only); with `per_series` the
    ratio is taken per series (per filesystem) and the fullest one counts.
    """

    available: str
    total: str
    matchers: str = ""
    per_series: bool = False
    data_filesystem: bool = False
    """Read only the filesystem mounted at `Scope.mountpoint` (the data dir's)."""

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.available, self.total)

    def promql(self, extra: str = "") -> str:
        avail = _select(self.available, self.matchers, extra)
        total = _select(self.total, self.matchers, extra)
        if self.per_series:
            return f"100 * max by (instance) (1 - {avail} / {total})"
        return f"100 * (1 - sum by (instance) ({avail}) / sum by (instance) ({total}))"


@dataclass(frozen=True)
class BusyPercent:
    """100 x (1 - idle share) of a per-CPU seconds counter, averaged over all CPUs."""

    counter: str
    idle_matcher: str
    window: str = RATE_WINDOW

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.counter,)

    def promql(self, extra: str = "") -> str:
        sel = _select(self.counter, self.idle_matcher, extra)
        return f"100 * (1 - avg by (instance) (rate({sel}[{self.window}])))"


@dataclass(frozen=True)
class ProcessBusyPercent:
    """100 x the CPU seconds per second of the busiest process series of an instance.

    One aioquic worker uses at most one core: a worker at 100 % is saturated while a
    4-core host reads 25 %, so this is taken per worker (per series) and the max counts.
    """

    counter: str
    window: str = RATE_WINDOW

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.counter,)

    def promql(self, extra: str = "") -> str:
        sel = _select(self.counter, "", extra)
        return f"100 * max by (instance) (rate({sel}[{self.window}]))"


FEDERATION_DOWN_WINDOW = "5m"
"""A peer counts as unreachable when every relay attempt failed for this long."""
FEDERATION_GROWTH_WINDOW = "15m"
"""A peer's outbound queue counts as growing when it grew over this whole window."""


@dataclass(frozen=True)
class FederationPeers:
    """The worst federation peer of an instance, as a level: 0 every peer fine, 1 a
    peer's outbound queue kept growing for `growth_window` (its 5-minute slope stayed
    above zero), 2 a peer unreachable (`peer_up == 0`) for the whole `down_window`.

    The windows are inside the expression (two conditions, two windows), so the trigger
    itself has no sustain window. A server without federation exports none of these
    series: the trigger then does not apply (`Trigger.optional`).
    """

    peer_up: str = "qpq_federation_peer_up"
    queue_depth: str = "qpq_federation_queue_depth"
    down_window: str = FEDERATION_DOWN_WINDOW
    growth_window: str = FEDERATION_GROWTH_WINDOW
    slope_window: str = "5m"

    @property
    def metrics(self) -> tuple[str, ...]:
        return (self.peer_up, self.queue_depth)

    @property
    def window(self) -> str:
        """How far back the expression reads (the growth window plus one slope)."""
        return f"{_window_s(self.growth_window) + _window_s(self.slope_window)}s"

    def promql(self, extra: str = "") -> str:
        up = _select(self.peer_up, "", extra)
        depth = _select(self.queue_depth, "", extra)
        # Each condition counts only when the series reaches back over its whole window
        # (`present_over_time ... offset`): a Prometheus started two minutes ago has not
        # seen a peer down for five. label_replace keeps the two conditions of one peer
        # apart, so `or` keeps both and the max picks the worse one.
        down = (f"2 * (max_over_time({up}[{self.down_window}]) == bool 0) "
                f"and present_over_time({up}[{self.down_window}] offset {self.down_window})")
        growing = (f"min_over_time(deriv({depth}[{self.slope_window}])"
                   f"[{self.growth_window}:1m]) > bool 0 "
                   f"and present_over_time({depth}[{self.slope_window}] "
                   f"offset {self.growth_window})")
        return (f'max by (instance) (label_replace({down}, "condition", "unreachable", "", "")'
                f' or label_replace({growing}, "condition", "queue_growing", "", ""))')


Measure = (Gauge | PerMinute | Quantile | RatioPercent | UsedPercent | BusyPercent
           | ProcessBusyPercent | FederationPeers)


# --- the trigger ---------------------------------------------------------------------------

Unit = Literal["percent", "seconds", "messages", "per_minute", "level"]


@dataclass(frozen=True)
class Trigger:
    """One row of the scaling guide's trigger table.

    `expr` is the PromQL of the current value, one series per `instance`; the state is
    warning/critical when the value is beyond the threshold (strictly, as the guide's
    "> 70%") in `direction`, and for `sustain_s > 0` only when it stayed there for the
    whole window.
    """

    id: str
    title: str
    measures: str
    unit: Unit
    measure: Measure
    warning: float
    critical: float
    sustain_s: int
    alert_for_s: int
    action: str
    source: Source
    direction: Direction = Direction.ABOVE
    levels: tuple[str, ...] = ()
    """For unit "level": what each level 0, 1, ... means (alert summaries say it)."""
    optional: str = ""
    """When set, why an instance may export none of the trigger's series (a feature
    switched off): the trigger then does not apply there and is listed as skipped with
    this reason, neither no-data nor a silent ok."""

    @property
    def expr(self) -> str:
        """The PromQL of the value with the default scope (jobs qpq and node, `/`)."""
        return self.expr_in(DEFAULT_SCOPE)

    def local_matchers(self, scope: Scope) -> str:
        """Matchers that hold inside one scrape (no `job`): the data filesystem."""
        measure = self.measure
        if isinstance(measure, UsedPercent) and measure.data_filesystem:
            return f'mountpoint="{_quote(scope.mountpoint)}"'
        return ""

    def matchers_in(self, scope: Scope, extra: str = "") -> str:
        """Every matcher the trigger's series need in Prometheus: job, filesystem, extra."""
        parts = [f'job="{_quote(scope.job(self.source))}"', self.local_matchers(scope),
                 _inner_matchers(extra)]
        return ",".join(p for p in parts if p)

    def expr_in(self, scope: Scope, extra: str = "") -> str:
        """The expression reading only `scope`'s series, plus `extra` matchers."""
        return self.measure.promql(self.matchers_in(scope, extra))

    @property
    def metrics(self) -> tuple[str, ...]:
        """The exported metric names the expression reads."""
        return self.measure.metrics

    @property
    def runbook_anchor(self) -> str:
        return self.id

    @property
    def runbook(self) -> str:
        """Relative link to the trigger's runbook section."""
        return f"{RUNBOOK_DOC}#{self.runbook_anchor}"

    def threshold(self, severity: Severity) -> float:
        return self.critical if severity is Severity.CRITICAL else self.warning

    def beyond(self, value: float, threshold: float) -> bool:
        """True when `value` is past `threshold` on the bad side."""
        return value > threshold if self.direction is Direction.ABOVE else value < threshold

    def state_for(self, value: float | None) -> State:
        """ok/warning/critical for a value; None or NaN (absent metric) is no-data."""
        if value is None or math.isnan(value):
            return State.NO_DATA
        if self.beyond(value, self.critical):
            return State.CRITICAL
        if self.beyond(value, self.warning):
            return State.WARNING
        return State.OK

    def comparison(self, severity: Severity) -> str:
        """PromQL comparison suffix for alert rules, e.g. '> 90'."""
        op = ">" if self.direction is Direction.ABOVE else "<"
        return f"{op} {_fmt(self.threshold(severity))}"


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


TRIGGERS: tuple[Trigger, ...] = (
    Trigger(
        id="cpu",
        title="CPU usage",
        measures="Share of CPU time not idle, averaged over all cores, from node_exporter's "
        "node_cpu_seconds_total.",
        unit="percent",
        measure=BusyPercent("node_cpu_seconds_total", 'mode="idle"'),
        warning=70.0,
        critical=90.0,
        sustain_s=300,
        alert_for_s=300,
        action="Add CPU or scale horizontally (more worker processes, then more nodes).",
        source=Source.NODE,
    ),
    Trigger(
        id="memory",
        title="Memory usage",
        measures="Share of RAM not available to new allocations, from node_exporter's "
        "node_memory_MemAvailable_bytes and node_memory_MemTotal_bytes.",
        unit="percent",
        measure=UsedPercent("node_memory_MemAvailable_bytes", "node_memory_MemTotal_bytes"),
        warning=75.0,
        critical=90.0,
        sustain_s=0,
        alert_for_s=120,
        action="Increase memory; check the qpq process for leaks (process_resident_memory_bytes).",
        source=Source.NODE,
    ),
    Trigger(
        id="disk_usage",
        title="Disk usage",
        measures="Space used on the filesystem that holds the data dir (its mountpoint, "
        "set at render time and with --mountpoint), from node_exporter's "
        "node_filesystem_avail_bytes and node_filesystem_size_bytes.",
        unit="percent",
        measure=UsedPercent(
            "node_filesystem_avail_bytes",
            "node_filesystem_size_bytes",
            per_series=True,
            data_filesystem=True,
        ),
        warning=70.0,
        critical=90.0,
        sustain_s=0,
        alert_for_s=300,
        action="Expand the volume; clean old data (shorter retention, prune old backups).",
        source=Source.NODE,
    ),
    Trigger(
        id="disk_io_latency",
        title="Disk I/O latency p95",
        measures="95th percentile of storage commit time over 5 minutes, from "
        "qpq_db_write_duration_seconds.",
        unit="seconds",
        measure=Quantile("qpq_db_write_duration_seconds", 0.95),
        warning=0.005,
        critical=0.020,
        sustain_s=0,
        alert_for_s=300,
        action="Move the data directory to faster storage (NVMe SSD).",
        source=Source.QPQ,
    ),
    Trigger(
        id="delivery_queue_depth",
        title="Delivery queue depth",
        measures="Messages waiting for delivery in all queues, from qpq_delivery_queue_depth.",
        unit="messages",
        measure=Gauge("qpq_delivery_queue_depth"),
        warning=10_000.0,
        critical=100_000.0,
        sustain_s=0,
        alert_for_s=300,
        action="Investigate stale queues (recipients that never fetch) and slow delivery.",
        source=Source.QPQ,
    ),
    Trigger(
        id="rate_limit_hits",
        title="Rate-limit hits per minute",
        measures="Requests refused by the rate limiter per minute, from "
        "qpq_rate_limit_hit_total.",
        unit="per_minute",
        measure=PerMinute("qpq_rate_limit_hit_total"),
        warning=100.0,
        critical=1000.0,
        sustain_s=0,
        alert_for_s=120,
        action="Investigate abuse (which accounts and addresses); adjust [rate_limit] if "
        "legitimate traffic is refused.",
        source=Source.QPQ,
    ),
    Trigger(
        id="login_failures",
        title="Login failures per minute",
        measures="Failed logins per minute, from qpq_auth_login_failure_total.",
        unit="per_minute",
        measure=PerMinute("qpq_auth_login_failure_total"),
        warning=50.0,
        critical=500.0,
        sustain_s=0,
        alert_for_s=60,
        action="Potential brute-force attack: find the sources, block them, tighten "
        "[rate_limit].",
        source=Source.QPQ,
    ),
    Trigger(
        id="connections",
        title="Connections vs cap",
        measures="Open QUIC connections as a share of the configured cap, from "
        "qpq_connections_active and qpq_connections_max.",
        unit="percent",
        measure=RatioPercent("qpq_connections_active", "qpq_connections_max"),
        warning=80.0,
        critical=95.0,
        sustain_s=0,
        alert_for_s=120,
        action="Scale horizontally (add a node behind the UDP load balancer) or raise "
        "[quic] max_connections if the host has room.",
        source=Source.QPQ,
    ),
    Trigger(
        id="tls_handshake_latency",
        title="TLS handshake p95",
        measures="95th percentile of QUIC/TLS handshake time over 5 minutes, from "
        "qpq_tls_handshake_duration_seconds.",
        unit="seconds",
        measure=Quantile("qpq_tls_handshake_duration_seconds", 0.95),
        warning=0.1,
        critical=0.5,
        sustain_s=0,
        alert_for_s=300,
        action="Add CPU (handshakes are CPU-bound); check the network path for loss.",
        source=Source.QPQ,
    ),
    Trigger(
        id="process_cpu",
        title="Worker CPU",
        measures="CPU time of the busiest qpq worker process as a share of one core, "
        "from process_cpu_seconds_total (one aioquic process cannot use a second core).",
        unit="percent",
        measure=ProcessBusyPercent("process_cpu_seconds_total"),
        warning=80.0,
        critical=95.0,
        sustain_s=300,
        alert_for_s=300,
        action="Run more worker processes ([server] workers = N or \"auto\"), then more "
        "nodes; a 4-core host at 25 % can have one saturated worker.",
        source=Source.QPQ,
    ),
    Trigger(
        id="federation",
        title="Federation peers",
        measures="The worst peer of the instance: 1 when a peer's outbound queue "
        "(qpq_federation_queue_depth) kept growing for 15 minutes, 2 when a peer was "
        "unreachable (qpq_federation_peer_up == 0) for 5 minutes, else 0.",
        unit="level",
        measure=FederationPeers(),
        warning=0.0,
        critical=1.0,
        sustain_s=0,
        alert_for_s=0,
        action="Find the peer (`qpq-ops doctor --config PATH`, the dashboard's peer "
        "panels), check its address, firewall (UDP 7001) and federation certificate; "
        "relays wait in the durable queue meanwhile.",
        source=Source.QPQ,
        levels=("every peer fine", "a peer's outbound queue growing for 15 minutes",
                "a peer unreachable for 5 minutes"),
        optional="federation is not enabled there (no qpq_federation_* series)",
    ),
)

_BY_ID = {t.id: t for t in TRIGGERS}


def get_trigger(trigger_id: str) -> Trigger:
    """The trigger with this id; KeyError naming the known ids otherwise."""
    try:
        return _BY_ID[trigger_id]
    except KeyError:
        raise KeyError(
            f"unknown trigger {trigger_id!r}; known: {', '.join(TRIGGER_IDS)}"
        ) from None


def validate_triggers(triggers: tuple[Trigger, ...]) -> None:
    """Fail at import when the table is inconsistent (a swapped threshold, a lost id)."""
    ids = tuple(t.id for t in triggers)
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate trigger ids: {ids}")
    if ids != TRIGGER_IDS:
        raise ValueError(f"trigger ids {ids} differ from DESIGN.md's {TRIGGER_IDS}")
    for t in triggers:
        if not t.beyond(t.critical, t.warning):
            raise ValueError(
                f"trigger {t.id}: critical {t.critical} is not stricter than "
                f"warning {t.warning} ({t.direction})"
            )
        if t.unit == "level" and len(t.levels) != int(t.critical) + 2:
            raise ValueError(f"trigger {t.id}: name every level up to critical + 1")
        if t.sustain_s < 0 or t.alert_for_s < t.sustain_s:
            raise ValueError(f"trigger {t.id}: need 0 <= sustain_s <= alert_for_s")


validate_triggers(TRIGGERS)
