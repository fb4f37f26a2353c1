"""Expand the small Go-template subset our alert annotations use, as Prometheus would.

The generated promtool tests state the exact annotation text each firing alert must
carry; this computes it. Anything outside the subset raises, so a new template
construct cannot silently produce an untested expectation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from qpq_ops.render.units import go_humanize, go_humanize_duration

__all__ = ["expand"]

_VALUE_FUNCS: dict[str, Callable[[float], str]] = {
    '{{ printf "%.0f" $value }}': lambda v: f"{v:.0f}",
    '{{ printf "%.1f" $value }}': lambda v: f"{v:.1f}",
    '{{ printf "%.2f" $value }}': lambda v: f"{v:.2f}",
    "{{ humanize $value }}": go_humanize,
    "{{ humanizeDuration $value }}": go_humanize_duration,
}
_LABEL = re.compile(r"\{\{ \$labels\.([a-zA-Z_][a-zA-Z0-9_]*) \}\}")


def expand(template: str, labels: Mapping[str, str], value: float) -> str:
    text = _LABEL.sub(lambda m: labels[m.group(1)], template)
    for pattern, func in _VALUE_FUNCS.items():
        if pattern in text:
            text = text.replace(pattern, func(value))
    if "{{" in text:
        raise ValueError(f"template construct not supported by the test generator: {text!r}")
    return text
