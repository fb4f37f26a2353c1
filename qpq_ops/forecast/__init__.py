"""`qpq-ops capacity forecast`: when will a scaling trigger's line be crossed?

`run_forecast(url, ...) -> ForecastResult` reads the history of every trigger that
measures a level that grows with use (`FORECAST_TRIGGER_IDS`, thresholds from
`qpq_ops.triggers`), fits each per instance (`trend`), and re-runs the capacity plan on
the observed peaks (`outlook`). The message rate is read too (no threshold of its own:
it drives the plan and is charted by `qpq-ops report`), and so is the data kept in blob
storage (`qpq_blob_bytes`), whose growth per day is reported beside the disk trend.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from qpq_ops.calibration import REFERENCE, Calibration
from qpq_ops.capacity import CapacityInputs
from qpq_ops.exit_codes import ExitCode
from qpq_ops.forecast.duration import DurationError, format_duration, parse_duration
from qpq_ops.forecast.fit import Series, fit_line
from qpq_ops.forecast.history import fetch_ranges, instance_matcher, step_for
from qpq_ops.forecast.outlook import DEFAULT_INPUTS, CapacityOutlook, capacity_outlook
from qpq_ops.forecast.trend import (
    MIN_POINTS,
    MIN_SPAN_S,
    Confidence,
    CrossingStatus,
    TriggerForecast,
    forecast_trigger,
)
from qpq_ops.triggers import DEFAULT_SCOPE, State, get_trigger, worst_state

__all__ = [
    "FORECAST_TRIGGER_IDS",
    "CapacityOutlook",
    "Confidence",
    "CrossingStatus",
    "DurationError",
    "ForecastResult",
    "StorageGrowth",
    "TriggerForecast",
    "format_duration",
    "parse_duration",
    "run_forecast",
]

# Triggers whose measure is a level that grows with use and data; the others (CPU and
# latencies, abuse counters) follow load spikes or attacks, not a trend worth dating.
FORECAST_TRIGGER_IDS: tuple[str, ...] = (
    "disk_usage", "memory", "connections", "delivery_queue_depth",
)

_EXIT = {State.CRITICAL: ExitCode.CRITICAL, State.WARNING: ExitCode.WARNING,
         State.NO_DATA: ExitCode.CANNOT_EVALUATE, State.OK: ExitCode.OK}


@dataclass(frozen=True)
class StorageGrowth:
    """Bytes in blob storage on one instance and their Theil-Sen growth per day."""

    instance: str
    series: Series
    bytes_per_day: float | None
    """None with too little history (the same minimum as the triggers')"""

    def to_json(self) -> dict[str, object]:
        per_day = self.bytes_per_day
        return {"instance": self.instance, "current_bytes": self.series.last,
                "bytes_per_day": per_day,
                "bytes_per_month": None if per_day is None else per_day * 30}


def _storage_growth(per_instance: dict[str, Series], now: float) -> list[StorageGrowth]:
    growth = []
    for instance, series in sorted(per_instance.items()):
        enough = len(series) >= MIN_POINTS and series.span_s >= MIN_SPAN_S
        slope = fit_line(series, now).slope_per_day if enough else None
        growth.append(StorageGrowth(instance, series, slope))
    return growth


@dataclass(frozen=True)
class ForecastResult:
    url: str
    now: float
    lookback_s: int
    horizon_s: int
    step_s: int
    forecasts: tuple[TriggerForecast, ...]
    message_rate: dict[str, Series]
    """messages enqueued per minute, per instance"""
    outlook: CapacityOutlook | None
    storage: tuple[StorageGrowth, ...] = ()

    @property
    def status(self) -> State:
        return worst_state([f.state for f in self.forecasts])

    @property
    def exit_code(self) -> ExitCode:
        """2 critical line within the horizon, else 1 warning, else 3 no-data, else 0."""
        return _EXIT[self.status]

    @property
    def instances(self) -> list[str]:
        return sorted({f.instance for f in self.forecasts} | set(self.message_rate)
                      | {g.instance for g in self.storage})

    def to_json(self) -> dict[str, object]:
        return {
            "status": str(self.status), "prometheus_url": self.url, "now": self.now,
            "lookback_s": self.lookback_s, "horizon_s": self.horizon_s,
            "forecasts": [f.to_json() for f in self.forecasts],
            "capacity": None if self.outlook is None else self.outlook.to_json(),
            "storage_growth": [g.to_json() for g in self.storage],
        }


def run_forecast(url: str, *, lookback_s: int, horizon_s: int,
                 instances: Sequence[str] = (), trigger_ids: Sequence[str] = (),
                 timeout: float = 30.0, now: float | None = None,
                 base_inputs: CapacityInputs = DEFAULT_INPUTS,
                 calibration: Calibration | None = REFERENCE) -> ForecastResult:
    """Raises `SourceError` (one line) when Prometheus cannot answer in `timeout` s."""
    end = time.time() if now is None else now
    step = step_for(lookback_s)
    matcher = instance_matcher(instances)
    triggers = [get_trigger(i) for i in (trigger_ids or FORECAST_TRIGGER_IDS)]
    rate_window = f"{max(300, 2 * step)}s"
    enqueue = f"qpq_enqueue_total{{{matcher}}}"
    exprs = {t.id: t.expr_in(DEFAULT_SCOPE, matcher) for t in triggers}
    exprs |= {
        "_rate": f"60 * sum by (instance) (rate({enqueue}[{rate_window}]))",
        "_users": f"sum(qpq_connections_active{{{matcher}}})",
        "_msgs_per_hour": f"3600 * sum(rate({enqueue}[{rate_window}]))",
        "_blob_bytes": f"sum by (instance) (qpq_blob_bytes{{{matcher}}})",
    }
    ranges = fetch_ranges(url, exprs, start=end - lookback_s, end=end, step_s=step,
                          timeout=timeout)
    forecasts: list[TriggerForecast] = []
    for trigger in triggers:
        per_instance = ranges[trigger.id].by("instance")
        wanted = list(instances) or sorted(per_instance) or [""]
        for instance in wanted:
            forecasts.append(forecast_trigger(
                trigger, instance, per_instance.get(instance, Series((), ())), now=end,
                horizon_s=horizon_s, lookback_s=lookback_s))
    users = next(iter(ranges["_users"].series.values()), Series((), ()))
    msgs = next(iter(ranges["_msgs_per_hour"].series.values()), Series((), ()))
    outlook = capacity_outlook(users, msgs, now=end, horizon_s=horizon_s, base=base_inputs,
                               calibration=calibration)
    storage = _storage_growth(ranges["_blob_bytes"].by("instance"), end)
    return ForecastResult(url.rstrip("/"), end, lookback_s, horizon_s, step,
                          tuple(forecasts), ranges["_rate"].by("instance"), outlook,
                          tuple(storage))
