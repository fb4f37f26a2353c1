"""From one trigger's history to the dates its warning and critical lines will be reached.

Pure: a `Series` and the `Trigger` (from `qpq_ops.triggers`, the single definition) in, a
`TriggerForecast` out. Rules, all visible in the output's notes:
- fewer than `MIN_POINTS` points or less than `MIN_SPAN_S` of history: no forecast;
- confidence is "low" when the history covers under half the lookback, when a date lies
  more than `MAX_EXTRAPOLATION` x the history's span ahead, or when the slope's 95 %
  interval admits a flat trend and also a line crossed within the horizon (noise that
  could change the verdict); otherwise "high";
- a line is "reached" when the latest value is already past it (check-triggers' job, but
  the forecast says so rather than predicting the past).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from qpq_ops.forecast.duration import format_duration
from qpq_ops.forecast.fit import DAY, LineFit, Series, crossing_time, fit_line
from qpq_ops.triggers import Direction, Severity, State, Trigger

__all__ = [
    "MAX_EXTRAPOLATION",
    "MIN_POINTS",
    "MIN_SPAN_S",
    "Confidence",
    "Crossing",
    "CrossingStatus",
    "TriggerForecast",
    "forecast_trigger",
    "iso_date",
]

MIN_POINTS = 10
MIN_SPAN_S = DAY
MAX_EXTRAPOLATION = 3.0


class Confidence(StrEnum):
    HIGH = "high"
    LOW = "low"
    NONE = "none"
    """no forecast: no data or too little history"""


class CrossingStatus(StrEnum):
    REACHED = "reached"
    FORECAST = "forecast"
    """crossed within the horizon, at `at`"""
    NOT_WITHIN_HORIZON = "not within the horizon"
    UNKNOWN = "unknown"
    """no forecast (no data or too little history)"""


def iso_date(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Crossing:
    severity: Severity
    threshold: float
    status: CrossingStatus
    at: float | None = None
    """unix time the fitted line reaches the threshold (also set beyond the horizon)"""
    earliest: float | None = None
    latest: float | None = None
    """the range the slope's confidence interval allows (None: not within any horizon)"""

    def describe(self, horizon_s: float) -> str:
        if self.status is CrossingStatus.REACHED:
            return "reached now"
        if self.status is CrossingStatus.UNKNOWN:
            return "unknown"
        if self.status is CrossingStatus.NOT_WITHIN_HORIZON:
            return f"not within the horizon ({format_duration(horizon_s)})"
        assert self.at is not None
        text = iso_date(self.at)
        if self.earliest is not None and self.latest is not None and (
            iso_date(self.earliest) != iso_date(self.latest)
        ):
            text += f" ({iso_date(self.earliest)} to {iso_date(self.latest)})"
        elif self.earliest is not None and self.latest is None:
            text += f" (from {iso_date(self.earliest)}; may not happen)"
        return text

    def to_json(self) -> dict[str, object]:
        def day(t: float | None) -> str | None:
            return None if t is None else iso_date(t)

        return {"severity": str(self.severity), "threshold": self.threshold,
                "status": str(self.status), "date": day(self.at), "at": self.at,
                "earliest": day(self.earliest), "latest": day(self.latest)}


@dataclass(frozen=True)
class TriggerForecast:
    trigger: Trigger
    instance: str
    series: Series
    fit: LineFit | None
    confidence: Confidence
    crossings: tuple[Crossing, ...]
    notes: tuple[str, ...]
    now: float
    horizon_s: float

    @property
    def state(self) -> State:
        """The worst line crossed within the horizon; no-data when there is no forecast."""
        if self.confidence is Confidence.NONE:
            return State.NO_DATA
        within = {c.severity for c in self.crossings
                  if c.status in (CrossingStatus.REACHED, CrossingStatus.FORECAST)}
        if Severity.CRITICAL in within:
            return State.CRITICAL
        return State.WARNING if Severity.WARNING in within else State.OK

    def crossing(self, severity: Severity) -> Crossing:
        return next(c for c in self.crossings if c.severity is severity)

    def to_json(self) -> dict[str, object]:
        t = self.trigger
        fit = self.fit
        return {
            "id": t.id, "instance": self.instance, "state": str(self.state),
            "unit": t.unit, "current": self.series.last,
            "warning": t.warning, "critical": t.critical,
            "slope_per_day": None if fit is None else fit.slope_per_day,
            "slope_per_day_interval": None if fit is None else [
                fit.slope_low_per_day, fit.slope_high_per_day],
            "points": len(self.series), "history_s": self.series.span_s,
            "confidence": str(self.confidence), "notes": list(self.notes),
            "crossings": [c.to_json() for c in self.crossings],
            "action": t.action,
        }


def _unknown(trigger: Trigger) -> tuple[Crossing, ...]:
    return tuple(Crossing(s, trigger.threshold(s), CrossingStatus.UNKNOWN)
                 for s in (Severity.WARNING, Severity.CRITICAL))


def _crossing(trigger: Trigger, severity: Severity, fit: LineFit, current: float,
              now: float, horizon_s: float) -> Crossing:
    threshold = trigger.threshold(severity)
    if trigger.beyond(current, threshold):
        return Crossing(severity, threshold, CrossingStatus.REACHED, now, now, now)
    above = trigger.direction is Direction.ABOVE

    def when(slope: float) -> float | None:
        t = crossing_time(fit.level, slope, now, threshold, above)
        return None if t is None else max(t, now)

    at = when(fit.slope_per_day)
    # The steeper end of the interval gives the earliest date, the shallower the latest.
    bounds = [when(fit.slope_low_per_day), when(fit.slope_high_per_day)]
    known = [b for b in bounds if b is not None]
    earliest = min(known) if known else None
    latest = max(known) if len(known) == 2 else None
    if at is None or at > now + horizon_s:
        return Crossing(severity, threshold, CrossingStatus.NOT_WITHIN_HORIZON, at,
                        earliest, latest)
    return Crossing(severity, threshold, CrossingStatus.FORECAST, at, earliest, latest)


def forecast_trigger(trigger: Trigger, instance: str, series: Series, *, now: float,
                     horizon_s: float, lookback_s: float) -> TriggerForecast:
    """Fit `series` and date the trigger's warning and critical lines."""
    def none(note: str) -> TriggerForecast:
        return TriggerForecast(trigger, instance, series, None, Confidence.NONE,
                               _unknown(trigger), (note,), now, horizon_s)

    if not series:
        return none("no data: metric absent (" + ", ".join(trigger.metrics) + ")")
    if len(series) < MIN_POINTS or series.span_s < MIN_SPAN_S:
        return none(f"too little history: {format_duration(series.span_s)} of data "
                    f"({len(series)} points); need at least {format_duration(MIN_SPAN_S)} "
                    f"and {MIN_POINTS} points")
    fit = fit_line(series, now)
    current = series.values[-1]
    crossings = tuple(_crossing(trigger, s, fit, current, now, horizon_s)
                      for s in (Severity.WARNING, Severity.CRITICAL))
    notes: list[str] = []
    low = False
    if series.span_s < lookback_s / 2:
        low = True
        notes.append(f"short history: {format_duration(series.span_s)} of the "
                     f"{format_duration(lookback_s)} lookback")
    # Noise matters only when it could change the verdict: the trend may be flat, yet
    # its steepest plausible slope would cross a line within the horizon.
    at_risk = [c.earliest for c in crossings if c.status is CrossingStatus.NOT_WITHIN_HORIZON
               and c.earliest is not None and c.earliest <= now + horizon_s]
    if fit.slope_uncertain and (at_risk or any(
            c.status is CrossingStatus.FORECAST for c in crossings)):
        low = True
        note = "noisy: the trend may be flat"
        if at_risk:
            note += f"; a line may be crossed as early as {iso_date(min(at_risk))}"
        notes.append(note)
    far = [c for c in crossings if c.status is CrossingStatus.FORECAST and c.at is not None
           and c.at - now > MAX_EXTRAPOLATION * series.span_s]
    if far:
        low = True
        notes.append(f"extrapolates more than {MAX_EXTRAPOLATION:g}x the history's span")
    confidence = Confidence.LOW if low else Confidence.HIGH
    return TriggerForecast(trigger, instance, series, fit, confidence, crossings,
                           tuple(notes), now, horizon_s)
