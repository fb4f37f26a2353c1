"""The forecast's pure parts: durations, the robust fit, the crossing rules; and that
`qpq-ops` starts without importing numpy, scipy or matplotlib."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qpq_ops.forecast.duration import DurationError, parse_duration
from qpq_ops.forecast.fit import DAY, Series, fit_line
from qpq_ops.forecast.trend import Confidence, CrossingStatus, forecast_trigger
from qpq_ops.triggers import Severity, get_trigger

NOW = 1_800_000_000.0


@pytest.mark.parametrize(("text", "seconds"), [
    ("14d", 14 * 86_400), ("36h", 36 * 3600), ("1w", 7 * 86_400), ("1d12h", 129_600),
    ("90m", 5400), (" 30d ", 30 * 86_400),
])
def test_durations_parse(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "14", "d", "14 d", "-1d", "1.5d", "0d", "2weeks"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


def _rising(days: float, per_day: float, start: float, step_h: float = 1.0) -> list[
        tuple[float, float]]:
    n = int(days * 24 / step_h)
    return [(NOW - days * DAY + i * step_h * 3600, start + per_day * i * step_h / 24)
            for i in range(n + 1)]


def test_theil_sen_ignores_spikes_and_a_cleanup_that_least_squares_follows() -> None:
    import numpy as np

    points = _rising(14, 1.0, 50.0)
    # every fifth point spikes by +30, and the last day was "cleaned up" by -15
    noisy = [(t, v + 30 if i % 5 == 0 else v) for i, (t, v) in enumerate(points)]
    noisy = [(t, v - 15 if t > NOW - DAY else v) for t, v in noisy]
    fit = fit_line(Series.of(noisy), NOW)
    assert fit.slope_per_day == pytest.approx(1.0, abs=0.1)
    t, v = np.array([p[0] for p in noisy]) / DAY, np.array([p[1] for p in noisy])
    least_squares = np.polyfit(t, v, 1)[0]
    assert abs(least_squares - 1.0) > 3 * abs(fit.slope_per_day - 1.0)


def test_crossing_dates_follow_the_line_and_its_interval() -> None:
    trigger = get_trigger("disk_usage")  # warning 70, critical 90
    f = forecast_trigger(trigger, "a", Series.of(_rising(14, 1.0, 50.0)), now=NOW,
                         horizon_s=30 * DAY, lookback_s=14 * DAY)
    warning, critical = f.crossing(Severity.WARNING), f.crossing(Severity.CRITICAL)
    assert warning.status is CrossingStatus.FORECAST
    assert warning.at == pytest.approx(NOW + 6 * DAY, abs=3600)
    assert critical.at == pytest.approx(NOW + 26 * DAY, abs=3600)
    assert f.confidence is Confidence.HIGH and f.state.value == "critical"


def test_a_line_already_passed_is_reached_now() -> None:
    trigger = get_trigger("disk_usage")
    f = forecast_trigger(trigger, "a", Series.of(_rising(14, 0.0, 75.0)), now=NOW,
                         horizon_s=30 * DAY, lookback_s=14 * DAY)
    assert f.crossing(Severity.WARNING).status is CrossingStatus.REACHED
    assert f.crossing(Severity.CRITICAL).status is CrossingStatus.NOT_WITHIN_HORIZON
    assert f.state.value == "warning"


def test_half_the_lookback_is_short_history_with_low_confidence() -> None:
    # 63 % after 3 days of +1 %/day: the warning line (75 %) is 12 days ahead, > 3 x 3 days
    f = forecast_trigger(get_trigger("memory"), "a", Series.of(_rising(3, 1.0, 60.0)),
                         now=NOW, horizon_s=30 * DAY, lookback_s=14 * DAY)
    assert f.confidence is Confidence.LOW
    assert any("short history" in n for n in f.notes)
    assert any("extrapolates" in n for n in f.notes)
    assert f.crossing(Severity.WARNING).at == pytest.approx(NOW + 12 * DAY, abs=3600)


def test_noise_lowers_confidence_only_when_it_could_change_the_verdict() -> None:
    import random

    rng = random.Random(1)
    def noisy(level: float) -> Series:
        return Series.of([(t, level + rng.uniform(-5, 5)) for t, _ in _rising(14, 0, 0)])

    far = forecast_trigger(get_trigger("disk_usage"), "a", noisy(20.0), now=NOW,
                           horizon_s=30 * DAY, lookback_s=14 * DAY)
    assert far.fit is not None and far.fit.slope_uncertain
    assert far.confidence is Confidence.HIGH, far.notes  # no plausible slope reaches 70 %
    # 60 % give or take 5: over a year ahead the steepest plausible slope reaches 70 %
    near = forecast_trigger(get_trigger("disk_usage"), "a", noisy(60.0), now=NOW,
                            horizon_s=400 * DAY, lookback_s=14 * DAY)
    assert near.confidence is Confidence.LOW
    assert any(n.startswith("noisy: the trend may be flat; a line may be crossed as early")
               for n in near.notes), near.notes


def test_a_falling_measure_never_crosses() -> None:
    f = forecast_trigger(get_trigger("disk_usage"), "a", Series.of(_rising(14, -1.0, 60.0)),
                         now=NOW, horizon_s=30 * DAY, lookback_s=14 * DAY)
    assert {c.status for c in f.crossings} == {CrossingStatus.NOT_WITHIN_HORIZON}
    assert all(c.at is None for c in f.crossings)


def test_qpq_ops_help_does_not_import_the_numeric_stack() -> None:
    code = ("import sys\nfrom qpq_ops.cli import app\n"
            "print(','.join(m for m in ('numpy', 'scipy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == ""
