"""How a trigger value of each unit is shown: in docs, in alert text, on the dashboard.

`value_template` is the Go template an alert annotation uses for the live `$value`;
`go_format` reproduces what Prometheus prints for it, so that the generated promtool
tests can state the exact expected annotation.
"""

from __future__ import annotations

import math

from qpq_ops.triggers import Unit

__all__ = [
    "duration_text",
    "go_format",
    "go_humanize",
    "go_humanize_duration",
    "grafana_unit",
    "human_value",
    "value_template",
]


def human_value(unit: Unit, value: float) -> str:
    """A threshold as a person reads it: 70%, 5 ms, 10,000, 100/min."""
    if unit == "percent":
        return f"{value:g}%"
    if unit == "seconds":
        return f"{value * 1000:g} ms" if value < 1 else f"{value:g} s"
    if unit == "messages":
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:,}"
    if unit == "level":
        return f"level {value:g}"
    return f"{value:g}/min"


def value_template(unit: Unit) -> str:
    """Go template that prints an alert's `$value` in this unit."""
    if unit == "percent":
        return '{{ printf "%.1f" $value }}%'
    if unit == "seconds":
        return "{{ humanizeDuration $value }}"
    if unit == "messages":
        # not `humanize`: it prints 99,999 as "100k", over a 100,000 threshold
        return '{{ printf "%.0f" $value }}'
    if unit == "level":
        return 'level {{ printf "%.0f" $value }}'
    return '{{ printf "%.0f" $value }}/min'


def go_format(unit: Unit, value: float) -> str:
    """What Prometheus renders `value_template(unit)` as, for `value`."""
    if unit == "percent":
        return f"{value:.1f}%"
    if unit == "seconds":
        return go_humanize_duration(value)
    if unit == "messages":
        return f"{value:.0f}"
    if unit == "level":
        return f"level {value:.0f}"
    return f"{value:.0f}/min"


def go_humanize(value: float) -> str:
    """Prometheus' `humanize` template function (SI prefixes, 4 significant digits)."""
    if value == 0 or math.isnan(value) or math.isinf(value):
        return f"{value:.4g}"
    prefix = ""
    if abs(value) >= 1:
        for candidate in ("k", "M", "G", "T", "P", "E", "Z", "Y"):
            if abs(value) < 1000:
                break
            prefix = candidate
            value /= 1000
        return f"{value:.4g}{prefix}"
    for candidate in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(value) >= 1:
            break
        prefix = candidate
        value *= 1000
    return f"{value:.4g}{prefix}"


def go_humanize_duration(value: float) -> str:
    """Prometheus' `humanizeDuration` template function."""
    if math.isnan(value) or math.isinf(value):
        return f"{value:.4g}"
    if value == 0:
        return f"{value:.4g}s"
    if abs(value) >= 1:
        sign = "-" if value < 0 else ""
        whole = int(abs(value))
        seconds, minutes = whole % 60, (whole // 60) % 60
        hours, days = (whole // 3600) % 24, whole // 86400
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {seconds}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {seconds}s"
        if minutes:
            return f"{sign}{minutes}m {seconds}s"
        return f"{sign}{abs(value):.4g}s"
    prefix = ""
    for candidate in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(value) >= 1:
            break
        prefix = candidate
        value *= 1000
    return f"{value:.4g}{prefix}s"


def duration_text(seconds: int) -> str:
    """A Prometheus duration for a whole number of seconds: 300 -> '5m', 93600 -> '26h'."""
    if seconds <= 0:
        return "0s"
    for size, suffix in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds % size == 0:
            return f"{seconds // size}{suffix}"
    return f"{seconds}s"


def grafana_unit(unit: Unit) -> str:
    """Grafana field unit id for a trigger unit."""
    return {"percent": "percent", "seconds": "s", "messages": "short",
            "per_minute": "short", "level": "short"}[unit]
