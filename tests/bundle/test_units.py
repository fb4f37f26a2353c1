"""Value formatting shared by docs, alert text and the promtool expectations."""

from __future__ import annotations

import pytest

from qpq_ops.render.template_expand import expand
from qpq_ops.render.units import (
    duration_text,
    go_format,
    go_humanize,
    go_humanize_duration,
    human_value,
    value_template,
)
from qpq_ops.triggers import TRIGGERS, Trigger


@pytest.mark.parametrize(("value", "text"), [
    (0, "0"), (55_000, "55k"), (150_000, "150k"), (1_234_567, "1.235M"), (12.5, "12.5"),
    (0.0125, "12.5m"),
])
def test_go_humanize_matches_prometheus(value: float, text: str) -> None:
    assert go_humanize(value) == text


@pytest.mark.parametrize(("value", "text"), [
    (0, "0s"), (0.0125, "12.5ms"), (0.3, "300ms"), (2.5, "2.5s"), (90, "1m 30s"),
    (97_200, "1d 3h 0m 0s"), (603_600, "6d 23h 40m 0s"),
])
def test_go_humanize_duration_matches_prometheus(value: float, text: str) -> None:
    assert go_humanize_duration(value) == text


@pytest.mark.parametrize(("seconds", "text"), [(300, "5m"), (93_600, "26h"), (90, "90s"),
                                               (86_400, "1d"), (0, "0s")])
def test_duration_text_uses_the_largest_whole_unit(seconds: int, text: str) -> None:
    assert duration_text(seconds) == text


def test_human_values_read_like_the_scaling_guide() -> None:
    assert human_value("percent", 70.0) == "70%"
    assert human_value("seconds", 0.005) == "5 ms"
    assert human_value("seconds", 0.5) == "500 ms"
    assert human_value("messages", 100_000.0) == "100,000"
    assert human_value("per_minute", 1000.0) == "1000/min"


def test_template_expansion_refuses_constructs_it_cannot_predict() -> None:
    assert expand("{{ $labels.instance }} at {{ humanize $value }}", {"instance": "n1"},
                  2000) == "n1 at 2k"
    with pytest.raises(ValueError, match="not supported"):
        expand("{{ $value | humanizePercentage }}", {}, 0.5)
    with pytest.raises(KeyError):
        expand("{{ $labels.job }}", {"instance": "n1"}, 1)


def _read_back(text: str) -> float:
    """The number an operator reads in an alert's value text ('99999', '5ms', '90.0%',
    'level 1')."""
    text = text.removeprefix("level ")
    for suffix, scale in (("/min", 1.0), ("%", 1.0), ("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * scale
    return float(text)


@pytest.mark.parametrize("trigger", TRIGGERS, ids=lambda t: t.id)
def test_a_value_just_under_a_threshold_never_reads_as_over_it(trigger: Trigger) -> None:
    for threshold in (trigger.warning, trigger.critical):
        for under in (threshold - 1, threshold * 0.9999, threshold - 0.04):
            if under <= 0 or under >= threshold:
                continue
            shown = go_format(trigger.unit, under)
            assert _read_back(shown) <= threshold, (under, shown)


def test_queue_depth_is_printed_exactly_not_humanized() -> None:
    # `humanize` would print 99,999 as "100k" next to "critical above 100,000"
    assert value_template("messages") == '{{ printf "%.0f" $value }}'
    assert go_format("messages", 99_999) == "99999"
