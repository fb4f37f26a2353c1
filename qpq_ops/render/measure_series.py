"""Synthetic input series that make a trigger's measure read a chosen value.

For each kind of `Measure` in `qpq_ops.triggers`, `series_for(trigger, instance, value)`
returns promtool input series (15 s apart, like a real scrape) on which the trigger's
own PromQL evaluates to `value` once its rate window is full. A measure kind without a
recipe here raises, so a trigger of a new kind cannot ship without promtool tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qpq_ops.render.selectors import NODE_JOB, QPQ_JOB
from qpq_ops.triggers import (
    BusyPercent,
    Gauge,
    Measure,
    PerMinute,
    Quantile,
    RatioPercent,
    Source,
    Trigger,
    UsedPercent,
)

__all__ = ["STEP_S", "InputSeries", "series_for", "window_seconds"]

STEP_S = 15
"""Sample spacing of the synthetic series (the bundle's scrape interval)."""

_TOTAL = 1000.0
"""Denominator of ratio measures: round, so that percentages come out exact."""
_OBSERVATIONS_PER_STEP = 20


@dataclass(frozen=True)
class InputSeries:
    series: str
    """promtool series notation: name{label="v",...}."""
    start: float
    step: float
    """Increase per sample (0 for a constant gauge)."""
    literal: str | None = None
    """promtool values notation used as is (e.g. '1x3 0x11'), instead of start/step."""

    def values(self, samples: int) -> str:
        if self.literal is not None:
            return self.literal
        if self.step == 0:
            return f"{_num(self.start)}x{samples - 1}"
        return f"{_num(self.start)}+{_num(self.step)}x{samples - 1}"


def _num(value: float) -> str:
    value = float(f"{value:.12g}")  # drop binary noise: 2.999999999999999 -> 3
    return str(int(value)) if value.is_integer() else repr(value)


_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _matchers(text: str) -> list[tuple[str, str, str]]:
    found: list[tuple[str, str, str]] = []
    pos = 0
    while pos < len(text):
        match = _MATCHER.match(text, pos)
        if match is None:
            raise ValueError(f"cannot read label matchers {text!r}")
        found.append((match.group(1), match.group(2), match.group(3)))
        pos = match.end()
    return found


def _matching_labels(text: str) -> dict[str, str]:
    """Labels that satisfy the matchers (e.g. fstype="ext4" for fstype!~"tmpfs|...")."""
    labels: dict[str, str] = {}
    for name, op, value in _matchers(text):
        if op == "=":
            labels[name] = value
        elif op == "=~":
            labels[name] = value.split("|")[0]
        else:
            candidate = "ext4" if name == "fstype" else "qpq-test"
            if (op == "!=" and candidate == value) or (
                op == "!~" and re.fullmatch(value, candidate)
            ):
                raise ValueError(f"no stand-in label value satisfies {name}{op}{value!r}")
            labels[name] = candidate
    return labels


def _excluded_labels(text: str) -> dict[str, str] | None:
    """Labels that a negative matcher rejects (to prove the filter is applied)."""
    for name, op, value in _matchers(text):
        if op in ("!~", "!="):
            return {**_matching_labels(text), name: value.split("|")[0]}
    return None


def _sel(metric: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{metric}{{{inner}}}"


def window_seconds(measure: Measure) -> int:
    """How long the measure needs data before it reads exactly (its rate window)."""
    window = getattr(measure, "window", "0s")
    match = re.fullmatch(r"(\d+)([smh])", window)
    if match is None:
        raise ValueError(f"unsupported window {window!r}")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


def series_for(trigger: Trigger, instance: str, value: float) -> list[InputSeries]:
    job = NODE_JOB if trigger.source is Source.NODE else QPQ_JOB
    base = {"instance": instance, "job": job}
    measure = trigger.measure
    if isinstance(measure, Gauge):
        return [InputSeries(_sel(measure.metric, base), value, 0)]
    if isinstance(measure, PerMinute):
        return [InputSeries(_sel(measure.counter, base), 0, value / 60 * STEP_S)]
    if isinstance(measure, BusyPercent):
        labels = {**base, "cpu": "0", **_matching_labels(measure.idle_matcher)}
        idle_per_s = 1 - value / 100
        return [InputSeries(_sel(measure.counter, labels), 0, idle_per_s * STEP_S)]
    if isinstance(measure, RatioPercent):
        return [
            InputSeries(_sel(measure.numerator, base), _TOTAL * value / 100, 0),
            InputSeries(_sel(measure.denominator, base), _TOTAL, 0),
        ]
    if isinstance(measure, UsedPercent):
        labels = {**base, **(_matching_labels(measure.matchers) if measure.matchers else {})}
        series = [
            InputSeries(_sel(measure.available, labels), _TOTAL * (1 - value / 100), 0),
            InputSeries(_sel(measure.total, labels), _TOTAL, 0),
        ]
        excluded = _excluded_labels(measure.matchers) if measure.matchers else None
        if excluded is not None:
            # A full filesystem the matchers exclude: it must not move the value.
            excluded = {**base, **excluded}
            series += [
                InputSeries(_sel(measure.available, excluded), 0, 0),
                InputSeries(_sel(measure.total, excluded), _TOTAL, 0),
            ]
        return series
    if isinstance(measure, Quantile):
        # All observations in the first bucket (0, le]: histogram_quantile interpolates
        # linearly inside it, so quantile q reads exactly q * le.
        upper = value / measure.q
        bucket = f"{measure.histogram}_bucket"
        return [
            InputSeries(_sel(bucket, {**base, "le": _num(upper)}), 0, _OBSERVATIONS_PER_STEP),
            InputSeries(_sel(bucket, {**base, "le": "+Inf"}), 0, _OBSERVATIONS_PER_STEP),
        ]
    raise NotImplementedError(
        f"trigger {trigger.id}: no promtool input recipe for measure "
        f"{type(measure).__name__}; add one to qpq_ops/render/measure_series.py"
    )
