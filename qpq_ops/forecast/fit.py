"""A robust straight-line fit of a measure's history, and where it crosses a threshold.

Theil-Sen (scipy.stats.theilslopes): the slope is the median of the slopes between every
pair of points, so a spike, a restart or a one-off cleanup (up to ~29 % of the points)
barely moves it, where least squares (PromQL `predict_linear`) follows them. scipy also
returns a 95 % confidence interval for the slope, which becomes the earliest and latest
date a threshold may be crossed.

numpy and scipy are imported inside `fit_line` so that `qpq-ops --help` starts fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DAY", "LineFit", "Series", "crossing_time", "fit_line"]

DAY = 86_400.0


@dataclass(frozen=True)
class Series:
    """One measure over time: unix seconds and values, oldest first, NaNs dropped."""

    times: tuple[float, ...]
    values: tuple[float, ...]

    @classmethod
    def of(cls, points: Sequence[tuple[float, float]]) -> Series:
        kept = sorted((t, v) for t, v in points if math.isfinite(v))
        return cls(tuple(t for t, _ in kept), tuple(v for _, v in kept))

    def __len__(self) -> int:
        return len(self.times)

    @property
    def span_s(self) -> float:
        return self.times[-1] - self.times[0] if self.times else 0.0

    @property
    def last(self) -> float | None:
        return self.values[-1] if self.values else None

    @property
    def peak(self) -> float | None:
        return max(self.values) if self.values else None


@dataclass(frozen=True)
class LineFit:
    """value(t) = level + slope_per_day x (t - anchor) / DAY, anchored at `anchor` (now)."""

    anchor: float
    level: float
    slope_per_day: float
    slope_low_per_day: float
    slope_high_per_day: float
    """the 95 % confidence interval of the slope"""
    spread: float
    """median absolute deviation of the points from the line (noise, in the measure's unit)"""

    def at(self, t: float) -> float:
        return self.level + self.slope_per_day * (t - self.anchor) / DAY

    @property
    def slope_uncertain(self) -> bool:
        """True when the interval admits a flat or reversed trend."""
        return self.slope_low_per_day <= 0 <= self.slope_high_per_day


def fit_line(series: Series, anchor: float) -> LineFit:
    """Theil-Sen fit of `series` (at least two points), anchored at `anchor`."""
    import numpy as np
    from scipy.stats import theilslopes

    x = (np.asarray(series.times) - anchor) / DAY
    y = np.asarray(series.values)
    if len(series) < 2 or float(np.ptp(x)) == 0.0:
        level = float(np.median(y))
        return LineFit(anchor, level, 0.0, 0.0, 0.0, float(np.median(np.abs(y - level))))
    result = theilslopes(y, x, alpha=0.95)
    slope, intercept = float(result.slope), float(result.intercept)
    low, high = float(result.low_slope), float(result.high_slope)
    spread = float(np.median(np.abs(y - (intercept + slope * x))))
    return LineFit(anchor, intercept, slope, min(low, high), max(low, high), spread)


def crossing_time(level: float, slope_per_day: float, anchor: float, threshold: float,
                  above: bool) -> float | None:
    """When a line at `level` (at `anchor`) moving by `slope_per_day` gets past `threshold`
    on the bad side (`above`: rising past it); `anchor` if already past; None if never."""
    gap = threshold - level
    if (gap < 0) if above else (gap > 0):
        return anchor
    towards = slope_per_day > 0 if above else slope_per_day < 0
    if not towards:
        return None
    return anchor + gap / slope_per_day * DAY
