"""Synthetic input series that make a trigger's measure read a chosen value.

For each kind of `Measure` in `qpq_ops.triggers`, `series_for(trigger, instance, value)`
returns promtool input series (15 s apart, like a real scrape) on which the trigger's
own PromQL evaluates to `value` once its rate window is full. A measure kind without a
recipe here raises, so a trigger of a new kind cannot ship without promtool tests.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from qpq_ops.render.settings import current
from qpq_ops.triggers import (
    BusyPercent,
    FederationPeers,
    Gauge,
    Measure,
    PerMinute,
    ProcessBusyPercent,
    Quantile,
    RatioPercent,
    Trigger,
    UsedPercent,
)

__all__ = ["FOREIGN_MOUNTPOINT", "SCRAPE_INTERVALS_S", "STEP_S", "InputSeries",
           "per_minute_increment", "series_for", "window_seconds",
           "window_seconds_of"]

STEP_S = 15
"""Sample spacing of the synthetic series (the bundle's scrape interval)."""
SCRAPE_INTERVALS_S = (15, 60)
"""Scrape intervals the generated tests cover: the bundle's and Prometheus's default."""
FOREIGN_MOUNTPOINT = "/boot/efi"
"""A full filesystem that is not the data volume: it must not move disk_usage."""

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
    reset_at: int | None = None
    """A counter restarts from zero at this sample index (it reads `step` there)."""
    precise: bool = False
    """Write `step` with every digit (a boundary test needs the exact float)."""

    def values(self, samples: int) -> str:
        if self.precise:
            return f"{_num(self.start)}+{self.step!r}x{samples - 1}"
        if self.literal is not None:
            return self.literal
        if self.reset_at is not None:
            k = self.reset_at
            return (f"{_num(self.start)}+{_num(self.step)}x{k - 1} "
                    f"{_num(self.step)}+{_num(self.step)}x{samples - k - 1}")
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
    return window_seconds_of(getattr(measure, "window", "0s"))


def window_seconds_of(window: str) -> int:
    """'5m' -> 300."""
    match = re.fullmatch(r"(\d+)([smh])", window)
    if match is None:
        raise ValueError(f"unsupported window {window!r}")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


def per_minute_increment(value: float, step_s: int, window_s: int,
                         eval_index: int) -> float | None:
    """A counter increment per sample on which `increase(c[window]) / minutes`
    evaluated at sample `eval_index` reads `value` bit-exactly in float64, or None.

    The window starts on a sample (Prometheus 2 ranges are closed), so increase() is
    (v[k] - v[k-n]) * (sampled / sampled) with v[i] = i * increment, as promtool expands
    `0+INCxN`. Whole-number increases are exact; a neighbouring float is tried otherwise.
    """
    n = window_s // step_s
    first, last = eval_index - n, eval_index
    up = down = value / 60 * step_s
    for _ in range(256):
        for candidate in (up, down):
            delta = candidate * last - candidate * first
            if delta * ((n * step_s) / (n * step_s)) / (window_s / 60) == value:
                return candidate
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
    return None


def series_for(trigger: Trigger, instance: str, value: float, step_s: int = STEP_S,
               job: str | None = None, reset_at: int | None = None,
               exact_at: int | None = None) -> list[InputSeries]:
    """Input series on which `trigger` reads `value` (once its window is full).

    `job` overrides the trigger's own job (a foreign job must not be read); `reset_at`
    makes a counter restart from zero at that sample (a restart must not move the rate);
    `exact_at` asks for a bit-exact reading at that sample index (boundary tests;
    ValueError when no input gives it).
    """
    job = current().scope.job(trigger.source) if job is None else job
    base = {"instance": instance, "job": job}
    measure = trigger.measure
    if isinstance(measure, Gauge):
        return [InputSeries(_sel(measure.metric, base), value, 0)]
    if isinstance(measure, PerMinute):
        increment = value / 60 * step_s
        if exact_at is not None:
            exact = per_minute_increment(value, step_s, window_seconds(measure), exact_at)
            if exact is None:
                raise ValueError(f"trigger {trigger.id}: no counter reads exactly {value}")
            return [InputSeries(_sel(measure.counter, base), 0, exact, precise=True)]
        return [InputSeries(_sel(measure.counter, base), 0, increment, reset_at=reset_at)]
    if isinstance(measure, BusyPercent):
        labels = {**base, "cpu": "0", **_matching_labels(measure.idle_matcher)}
        idle_per_s = 1 - value / 100
        return [InputSeries(_sel(measure.counter, labels), 0, idle_per_s * step_s)]
    if isinstance(measure, ProcessBusyPercent):
        # the saturated worker and an idle one on the same instance: the max counts
        busy = InputSeries(_sel(measure.counter, {**base, "worker": "1"}), 0,
                           value / 100 * step_s)
        idle = InputSeries(_sel(measure.counter, {**base, "worker": "2"}), 0, 0)
        return [busy, idle]
    if isinstance(measure, RatioPercent):
        return [
            InputSeries(_sel(measure.numerator, base), _TOTAL * value / 100, 0),
            InputSeries(_sel(measure.denominator, base), _TOTAL, 0),
        ]
    if isinstance(measure, UsedPercent):
        labels = {**base, **(_matching_labels(measure.matchers) if measure.matchers else {})}
        excluded = _excluded_labels(measure.matchers) if measure.matchers else None
        if measure.data_filesystem:
            labels["mountpoint"] = current().scope.mountpoint
            excluded = {**labels, "mountpoint": FOREIGN_MOUNTPOINT}
        series = [
            InputSeries(_sel(measure.available, labels), _TOTAL * (1 - value / 100), 0),
            InputSeries(_sel(measure.total, labels), _TOTAL, 0),
        ]
        if excluded is not None:
            # A full filesystem the matchers exclude: it must not move the value.
            excluded = {**base, **excluded}
            series += [
                InputSeries(_sel(measure.available, excluded), 0, 0),
                InputSeries(_sel(measure.total, excluded), _TOTAL, 0),
            ]
        return series
    if isinstance(measure, FederationPeers):
        # level 0: peer up, queue steady; 1: peer up, queue growing; 2: peer down.
        # A second, healthy peer on the same instance must not hide the bad one.
        if value not in (0, 1, 2):
            raise ValueError(f"trigger {trigger.id}: levels are 0, 1 or 2, not {value}")
        bad, good = {**base, "peer": "b.example"}, {**base, "peer": "c.example"}
        return [
            InputSeries(_sel(measure.peer_up, bad), 0 if value == 2 else 1, 0),
            InputSeries(_sel(measure.queue_depth, bad), 5, 1 if value >= 1 else 0),
            InputSeries(_sel(measure.peer_up, good), 1, 0),
            InputSeries(_sel(measure.queue_depth, good), 3, 0),
        ]
    if isinstance(measure, Quantile):
        # 90 % of the observations in (0, value], the rest above it: the q > 0.9 rank
        # falls in the +Inf bucket and histogram_quantile returns the highest finite
        # bound, `value`, bit-exactly (interpolation would be off by float noise).
        if not measure.q > 0.9:
            raise NotImplementedError(f"trigger {trigger.id}: quantile recipe needs q > 0.9")
        bucket = f"{measure.histogram}_bucket"
        below = _OBSERVATIONS_PER_STEP * 9 // 10
        return [
            InputSeries(_sel(bucket, {**base, "le": _num(value)}), 0, below),
            InputSeries(_sel(bucket, {**base, "le": "+Inf"}), 0, _OBSERVATIONS_PER_STEP),
        ]
    raise NotImplementedError(
        f"trigger {trigger.id}: no promtool input recipe for measure "
        f"{type(measure).__name__}; add one to qpq_ops/render/measure_series.py"
    )
