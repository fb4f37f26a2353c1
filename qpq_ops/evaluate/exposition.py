"""Compute a trigger's `Measure` from two scrapes of a Prometheus text exposition.

This is the direct-mode twin of `Measure.promql()`: the same recipe, computed in Python
from the samples of two scrapes taken `dt` seconds apart (counters become rates,
histogram buckets become a quantile over the interval).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from qpq_ops.errors import ParseError
from qpq_ops.triggers import (
    BusyPercent,
    FederationPeers,
    Gauge,
    Measure,
    PerMinute,
    ProcessBusyPercent,
    Quantile,
    RatioPercent,
    UsedPercent,
)

__all__ = ["Exposition", "Labels", "compute", "histogram_quantile", "parse"]

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Exposition:
    """Samples by sample name (`x_total`, `x_bucket`, ...), each label set -> value."""

    samples: Mapping[str, Mapping[Labels, float]]

    def series(self, name: str) -> Mapping[Labels, float]:
        return self.samples.get(name, {})


def parse(text: str) -> Exposition:
    samples: dict[str, dict[Labels, float]] = defaultdict(dict)
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                samples[sample.name][labels] = float(sample.value)
    except (ValueError, TypeError, IndexError) as exc:
        raise ParseError(str(exc).splitlines()[0] if str(exc) else "unparsable") from None
    return Exposition(dict(samples))


_MATCHER = re.compile(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _matches(labels: Labels, matchers: str) -> bool:
    values = dict(labels)
    for name, op, raw in _MATCHER.findall(matchers):
        value, actual = raw.encode().decode("unicode_escape"), values.get(name, "")
        ok = {
            "=": actual == value,
            "!=": actual != value,
            "=~": re.fullmatch(value, actual) is not None,
            "!~": re.fullmatch(value, actual) is None,
        }[op]
        if not ok:
            return False
    return True


def _sum(series: Mapping[Labels, float]) -> float | None:
    return math.fsum(series.values()) if series else None


def _deltas(first: Mapping[Labels, float], second: Mapping[Labels, float]) -> dict[Labels, float]:
    """Counter increase per series present in both scrapes (a reset counts from zero)."""
    return {k: (v - first[k] if v >= first[k] else v) for k, v in second.items() if k in first}


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float:
    """Prometheus's histogram_quantile over cumulative bucket counts keyed by `le`."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][0] != math.inf:
        return math.nan
    total = ordered[-1][1]
    if total <= 0:
        return math.nan
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for index, (le, count) in enumerate(ordered):
        if count >= rank:
            if le == math.inf:
                return ordered[index - 1][0] if index > 0 else math.nan
            if index == 0 and le <= 0:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return math.nan


def compute(measure: Measure, first: Exposition, second: Exposition, dt: float,
            matchers: str = "") -> float | None:
    """The measure's value over the interval; None when its metrics are absent.

    `matchers` (e.g. `mountpoint="/srv"`) restrict a filesystem measure's series."""
    if isinstance(measure, Gauge):
        return _sum(second.series(measure.metric))
    if isinstance(measure, RatioPercent):
        num, den = _sum(second.series(measure.numerator)), _sum(second.series(measure.denominator))
        if num is None or den is None:
            return None
        return math.nan if den == 0 else 100 * num / den
    if isinstance(measure, UsedPercent):
        return _used_percent(measure, second, matchers)
    if isinstance(measure, ProcessBusyPercent):
        if not second.series(measure.counter):
            return None
        deltas = _deltas(first.series(measure.counter), second.series(measure.counter))
        return 100 * max(deltas.values()) / dt if deltas else None
    if isinstance(measure, PerMinute):
        if not second.series(measure.counter):
            return None
        deltas = _deltas(first.series(measure.counter), second.series(measure.counter))
        return 60 * math.fsum(deltas.values()) / dt
    if isinstance(measure, Quantile):
        name = f"{measure.histogram}_bucket"
        if not second.series(name):
            return None
        by_le: dict[float, float] = defaultdict(float)
        for labels, delta in _deltas(first.series(name), second.series(name)).items():
            by_le[float(dict(labels).get("le", "nan"))] += delta
        return histogram_quantile(measure.q, by_le)
    if isinstance(measure, BusyPercent):
        idle = {k: v for k, v in second.series(measure.counter).items()
                if _matches(k, measure.idle_matcher)}
        if not idle:
            return None
        deltas = _deltas(first.series(measure.counter), idle)
        if not deltas:
            return None
        return 100 * (1 - math.fsum(d / dt for d in deltas.values()) / len(deltas))
    if isinstance(measure, FederationPeers):
        return _federation_level(measure, first, second)
    raise TypeError(f"unknown measure {measure!r}")


def _federation_level(measure: FederationPeers, first: Exposition,
                      second: Exposition) -> float | None:
    """The worst peer now: 2 down in both scrapes, 1 queue grew between them, else 0.
    Two scrapes cannot show the windows; the caller reports a bad level as "not
    sustained yet". None when the server exports no federation series at all."""
    up_now, depth_now = second.series(measure.peer_up), second.series(measure.queue_depth)
    if not up_now and not depth_now:
        return None
    up_before, depth_before = first.series(measure.peer_up), first.series(measure.queue_depth)
    levels = [0.0]
    levels += [2.0 for k, v in up_now.items() if v == 0 and up_before.get(k) == 0]
    levels += [1.0 for k, v in depth_now.items() if k in depth_before and v > depth_before[k]]
    return max(levels)


def _used_percent(measure: UsedPercent, scrape: Exposition, matchers: str) -> float | None:
    avail = {k: v for k, v in scrape.series(measure.available).items()
             if _matches(k, measure.matchers) and _matches(k, matchers)}
    total = {k: v for k, v in scrape.series(measure.total).items()
             if _matches(k, measure.matchers) and _matches(k, matchers)}
    if measure.per_series:
        used = [100 * (1 - avail[k] / total[k]) for k in avail if total.get(k)]
        return max(used) if used else None
    a, t = _sum(avail), _sum(total)
    if a is None or t is None:
        return None
    return math.nan if t == 0 else 100 * (1 - a / t)
