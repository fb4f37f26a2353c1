"""How a trigger measure reads to people, in every table and report (JSON keeps the raw
number). One place, so check-triggers, the forecast and the HTML report agree."""

from __future__ import annotations

__all__ = ["format_value", "signed_value"]


def format_value(value: float | None, unit: str) -> str:
    """A value in the trigger's unit: '71.7 %', '4.8 ms', '50.0/min', '10,000'."""
    if value is None:
        return "-"
    if unit == "percent":
        return f"{value:.1f} %"
    if unit == "seconds":
        return f"{value * 1000:,.1f} ms"
    if unit == "per_minute":
        return f"{value:,.1f}/min"
    return f"{value:,.0f}"


def signed_value(value: float, unit: str) -> str:
    """A change: '+1.0 %', '-3.0/min'; one that rounds to zero is '+0' (never '-0.0')."""
    text = format_value(abs(value), unit)
    return ("-" if value < 0 and text != format_value(0.0, unit) else "+") + text
