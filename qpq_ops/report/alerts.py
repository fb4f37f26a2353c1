"""The alerts that fired in the window, from Prometheus' `ALERTS` series.

`max_over_time(ALERTS{alertstate="firing"}[step])` at every step catches an alert that
fired for less than a step; consecutive steps join into one episode.
"""

from __future__ import annotations

from dataclasses import dataclass

from qpq_ops.forecast.history import RangeResult

__all__ = ["FiredAlert", "alerts_expr", "fired_alerts"]


@dataclass(frozen=True)
class FiredAlert:
    alertname: str
    instance: str
    severity: str
    first: float
    last: float
    """first and last step it was seen firing (to one step)"""
    episodes: int


def alerts_expr(matcher: str, step_s: int) -> str:
    inner = ",".join(p for p in ('alertstate="firing"', matcher) if p)
    return f"max_over_time(ALERTS{{{inner}}}[{step_s}s])"


def fired_alerts(result: RangeResult, step_s: int) -> list[FiredAlert]:
    alerts = []
    for key, series in result.series.items():
        if not series:
            continue
        labels = dict(key)
        gaps = sum(1 for a, b in zip(series.times, series.times[1:], strict=False)
                   if b - a > 1.5 * step_s)
        alerts.append(FiredAlert(labels.get("alertname", "?"), labels.get("instance", ""),
                                 labels.get("severity", ""), series.times[0],
                                 series.times[-1], gaps + 1))
    return sorted(alerts, key=lambda a: (a.first, a.alertname, a.instance))
