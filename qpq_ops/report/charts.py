"""Charts of the report: matplotlib figures rendered to inline SVG strings.

Each chart follows the page's colour scheme: text, axes and ticks are drawn in a sentinel
colour that is replaced by `currentColor` (the page's text colour, light or dark) and the
grid by `var(--grid)`; series and threshold colours read on both backgrounds. Threshold
lines carry ids `<chart>-threshold-warning|critical` so a browser test can find them.

matplotlib is imported inside the functions (`qpq-ops --help` stays fast) and used
through `Figure` only: no pyplot, no global figure state.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import UTC
from typing import TYPE_CHECKING, Any

from qpq_ops.forecast.fit import DAY, Series
from qpq_ops.forecast.trend import TriggerForecast
from qpq_ops.triggers import Severity

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["UNIT_LABELS", "rate_chart", "storage_chart", "trigger_chart"]

_FG = "#010101"
_GRID = "#020202"
OBSERVED = "#3b82f6"
TREND = "#a855f7"
WARNING = "#d97706"
CRITICAL = "#dc2626"

UNIT_LABELS = {
    "percent": "%",
    "messages": "messages waiting",
    "seconds": "seconds",
    "per_minute": "per minute",
}

_RC: dict[str, Any] = {
    "date.epoch": "1970-01-01T00:00:00",
    "svg.fonttype": "none",  # real <text>, so the page's font and colour apply
    "font.size": 9,
    "text.color": _FG, "axes.labelcolor": _FG, "axes.edgecolor": _FG,
    "xtick.color": _FG, "ytick.color": _FG, "grid.color": _GRID,
    "axes.grid": True, "grid.linewidth": 0.5, "legend.frameon": False,
    "figure.facecolor": "none", "axes.facecolor": "none", "savefig.transparent": True,
}


def _dates(times: tuple[float, ...] | list[float]) -> list[float]:
    """Unix seconds as matplotlib date numbers: days since its epoch, 1970-01-01 (the
    default, also pinned in `_RC`)."""
    return [t / DAY for t in times]


def _date(t: float) -> float:
    return _dates([t])[0]


def _svg(figure_id: str, draw: Callable[[Axes], None]) -> str:
    import matplotlib
    from matplotlib.figure import Figure

    rc: Any = {**_RC, "svg.hashsalt": figure_id}  # per-chart salt: unique ids in one page
    with matplotlib.rc_context(rc):
        fig = Figure(figsize=(7.2, 2.9), dpi=100, layout="constrained")
        ax = fig.subplots()
        draw(ax)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    return (svg.replace(_FG, "currentColor").replace(_GRID, "var(--grid)")
            .replace("<svg ", f'<svg class="chart-svg" data-chart="{figure_id}" ', 1))


def _date_axis(ax: Axes) -> None:
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    locator = AutoDateLocator(tz=UTC)  # type: ignore[no-untyped-call]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator, tz=UTC))  # type: ignore[no-untyped-call]
    ax.set_xlabel("date (UTC)")


def trigger_chart(forecast: TriggerForecast, chart_id: str) -> str:
    """History, the trend extended to the horizon (with its 95 % band) and both lines."""
    trigger = forecast.trigger
    series, fit, now = forecast.series, forecast.fit, forecast.now
    end = now + forecast.horizon_s

    def draw(ax: Axes) -> None:
        start = series.times[0] if series else now - forecast.horizon_s
        ax.plot(_dates(series.times), series.values, color=OBSERVED, linewidth=1.3,
                label="observed")
        if fit is not None:
            ax.plot(_dates([start, end]), [fit.at(start), fit.at(end)], color=TREND,
                    linestyle="--", linewidth=1.3, label="trend (Theil-Sen)")
            days = (end - now) / DAY
            low, high = (fit.level + s * days for s in (fit.slope_low_per_day,
                                                        fit.slope_high_per_day))
            ax.fill_between(_dates([now, end]), [fit.level, min(low, high)],
                            [fit.level, max(low, high)], color=TREND, alpha=0.15,
                            linewidth=0, label="95 % band")
        for severity, colour in ((Severity.WARNING, WARNING), (Severity.CRITICAL, CRITICAL)):
            value = trigger.threshold(severity)
            ax.axhline(value, color=colour, linewidth=1.2,
                       gid=f"{chart_id}-threshold-{severity}",
                       label=f"{severity} {value:g}")
        ax.axvline(_date(now), color=_FG, linestyle=":",
                   linewidth=0.8)
        top = max([trigger.critical, *series.values]) * 1.08
        if trigger.unit == "percent":
            ax.set_ylim(0, 100)
        elif trigger.critical >= 100 * max([1.0, *series.values]):
            # Counts far below a line 10x above the warning: a linear axis would flatten
            # them onto zero, so go logarithmic above 10 (linear below, 0 stays drawable).
            ax.set_yscale("symlog", linthresh=10)
            ax.set_ylim(0, top)
        else:
            ax.set_ylim(0, top)
        ax.set_xlim(_date(start), _date(end))
        ax.set_ylabel(UNIT_LABELS[trigger.unit])
        ax.set_title(f"{trigger.title} — {forecast.instance}", loc="left")
        _date_axis(ax)
        ax.legend(loc="upper left", ncols=3, fontsize=8)

    return _svg(chart_id, draw)


def rate_chart(series: Series, instance: str, chart_id: str, end: float) -> str:
    """Messages enqueued per minute: no threshold, the capacity plan's input. The x axis
    runs to `end` (the horizon) like the trigger charts, so they line up."""
    def draw(ax: Axes) -> None:
        ax.set_xlim(_date(series.times[0]), _date(end))
        ax.plot(_dates(series.times), series.values, color=OBSERVED, linewidth=1.3,
                label="messages enqueued")
        ax.set_ylim(bottom=0)
        ax.set_ylabel("messages per minute")
        ax.set_title(f"Message rate — {instance}", loc="left")
        _date_axis(ax)
        ax.legend(loc="upper left", fontsize=8)

    return _svg(chart_id, draw)


def storage_chart(series: Series, bytes_per_day: float | None, instance: str, chart_id: str,
                  now: float, end: float) -> str:
    """Bytes in blob storage (GB) and, with enough history, their trend to `end`."""
    def draw(ax: Axes) -> None:
        gb = [v / 1e9 for v in series.values]
        ax.plot(_dates(series.times), gb, color=OBSERVED, linewidth=1.3, label="stored")
        if bytes_per_day is not None and series.last is not None:
            # anchored on the latest value: the growth ahead, not a fit of the past
            last = series.last / 1e9
            ahead = last + bytes_per_day / 1e9 * (end - now) / DAY
            ax.plot(_dates([now, end]), [last, ahead], color=TREND, linestyle="--",
                    linewidth=1.3, label="trend (Theil-Sen)")
        ax.axvline(_date(now), color=_FG, linestyle=":", linewidth=0.8)
        ax.set_xlim(_date(series.times[0]), _date(end))
        ax.set_ylim(bottom=0)
        ax.set_ylabel("GB (10⁹ bytes)")
        ax.set_title(f"Blob storage — {instance}", loc="left")
        _date_axis(ax)
        ax.legend(loc="upper left", fontsize=8)

    return _svg(chart_id, draw)
