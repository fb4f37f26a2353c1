"""`capacity forecast` against a real Prometheus holding 14 days of written trends.

The history (tests/ops/synthetic_history.py) is backfilled with `promtool tsdb
create-blocks-from openmetrics` before Prometheus starts; the forecast must find the
dates the written trends imply, within a day.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qpq_ops.cli import app
from tests.helpers.ports import free_port
from tests.helpers.prometheus import RunningPrometheus, running_prometheus
from tests.ops import synthetic_history as synth

runner = CliRunner()
DAY = 86_400.0


@dataclass
class Stack:
    prom: RunningPrometheus
    now: float


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("forecast")
    now = float(int(time.time()))
    with running_prometheus(tmp, history=synth.history(now), retention="60d",
                            max_block_duration="400h") as prom:
        prom.wait_for('count(qpq_connections_active)', lambda r: bool(r) and r[0]["value"][1] == "3")
        yield Stack(prom, now)


def forecast(stack: Stack, *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    result = runner.invoke(app, ["capacity", "forecast", "--prometheus-url", stack.prom.url,
                                 "--json", *args])
    assert result.exit_code in (0, 1, 2, 3), result.output
    return result.exit_code, json.loads(result.stdout)


def rows(doc: dict) -> dict[tuple[str, str], dict]:  # type: ignore[type-arg]
    return {(f["id"], f["instance"]): f for f in doc["forecasts"]}


def crossing(row: dict, severity: str) -> dict:  # type: ignore[type-arg]
    return next(c for c in row["crossings"] if c["severity"] == severity)


def test_rising_disk_and_connections_are_dated_within_a_day(stack: Stack) -> None:
    code, doc = forecast(stack, "--instance", "growing")
    assert code == 2
    assert doc["status"] == "critical"
    by = rows(doc)
    disk, conns = by[("disk_usage", "growing")], by[("connections", "growing")]
    assert disk["slope_per_day"] == pytest.approx(1.0, abs=0.05)
    assert conns["slope_per_day"] == pytest.approx(2.0, abs=0.05)  # percent of the cap
    for row, severity, days in (
        (disk, "warning", synth.EXPECTED_DISK_WARNING_DAYS),
        (disk, "critical", synth.EXPECTED_DISK_CRITICAL_DAYS),
        (conns, "warning", synth.EXPECTED_CONN_WARNING_DAYS),
        (conns, "critical", synth.EXPECTED_CONN_CRITICAL_DAYS),
    ):
        c = crossing(row, severity)
        assert c["status"] == "forecast", row
        assert c["at"] == pytest.approx(stack.now + days * DAY, abs=DAY), (severity, row)
        assert c["earliest"] <= c["date"] <= c["latest"]
    assert disk["confidence"] == "high", disk["notes"]
    # Flat measures on the same instance stay clear.
    for trigger_id in ("memory", "delivery_queue_depth"):
        row = by[(trigger_id, "growing")]
        assert row["state"] == "ok"
        assert {c["status"] for c in row["crossings"]} == {"not within the horizon"}


def test_a_shorter_horizon_leaves_only_the_warning_line(stack: Stack) -> None:
    code, doc = forecast(stack, "--instance", "growing", "--trigger", "disk_usage",
                         "--horizon", "10d")
    assert code == 1
    row = rows(doc)[("disk_usage", "growing")]
    assert crossing(row, "warning")["status"] == "forecast"
    critical = crossing(row, "critical")
    assert critical["status"] == "not within the horizon"
    # The date is still given beyond the horizon.
    assert critical["at"] == pytest.approx(
        stack.now + synth.EXPECTED_DISK_CRITICAL_DAYS * DAY, abs=DAY)


NEGATIVE_ZERO = re.compile(r"(?<![\w-])-0(?:\.0+)?(?![\d.])")


def test_negative_zero_pattern_finds_numbers_not_dates() -> None:
    assert NEGATIVE_ZERO.search("trend -0.0 %/day") and NEGATIVE_ZERO.search("(-0)")
    assert not NEGATIVE_ZERO.search("until 2027-01-01, +0.0 %/day, -0.5 %/day")


def test_flat_series_are_not_within_the_horizon(stack: Stack) -> None:
    code, doc = forecast(stack, "--instance", "flat")
    assert code == 0
    assert doc["status"] == "ok"
    for row in doc["forecasts"]:
        assert row["instance"] == "flat"
        assert row["state"] == "ok"
        assert [c["status"] for c in row["crossings"]] == ["not within the horizon"] * 2
    human = runner.invoke(app, ["capacity", "forecast", "--prometheus-url", stack.prom.url,
                                "--instance", "flat"], env={"COLUMNS": "250"})
    assert human.exit_code == 0
    assert "not within the horizon" in human.stdout
    # A flat trend is +0, never -0 or -0.0 (a date such as 2027-01-01 is not a number).
    assert not NEGATIVE_ZERO.search(human.stdout), human.stdout


def test_too_little_history_says_so_and_exits_3(stack: Stack) -> None:
    code, doc = forecast(stack, "--instance", "young")
    assert code == 3
    assert doc["status"] == "no-data"
    for row in doc["forecasts"]:
        assert row["confidence"] == "none"
        assert row["state"] == "no-data"
        assert "too little history" in row["notes"][0], row
        assert {c["status"] for c in row["crossings"]} == {"unknown"}


def test_an_instance_without_series_is_no_data(stack: Stack) -> None:
    code, doc = forecast(stack, "--instance", "nowhere:9100")
    assert code == 3
    assert doc["capacity"] is None
    for row in doc["forecasts"]:
        assert row["instance"] == "nowhere:9100" and row["state"] == "no-data"
        assert row["notes"][0].startswith("no data: metric absent")


def test_every_instance_without_selector(stack: Stack) -> None:
    code, doc = forecast(stack, "--trigger", "disk_usage")
    states = {f["instance"]: f["state"] for f in doc["forecasts"]}
    assert states == {"growing": "critical", "flat": "ok", "young": "no-data"}
    assert code == 2


def test_capacity_plan_on_observed_peaks_says_when_a_second_worker_is_needed(
    stack: Stack, tmp_path: Path,
) -> None:
    calibration = synth.calibration_needing_a_second_worker_above(tmp_path, 500)
    _, doc = forecast(stack, "--trigger", "connections", "--calibration", str(calibration))
    capacity = doc["capacity"]
    now = capacity["now"]
    assert now["peak_users"] == pytest.approx(380 + 50 + 5, abs=3)
    assert now["peak_msgs_per_hour"] == pytest.approx(390 * 3600, rel=0.02)
    assert (now["workers"], now["hosts"]) == (1, 1)
    first = capacity["changes"][0]
    assert (first["workers"], first["hosts"]) == (2, 1)
    assert first["at"] == pytest.approx(
        stack.now + synth.EXPECTED_SECOND_WORKER_DAYS * DAY, abs=DAY)
    assert "2 worker(s) on 1 host(s) from " + first["date"] in capacity["summary"]


def test_plan_file_supplies_what_prometheus_cannot_observe(stack: Stack,
                                                           tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("users: 1\nmsgs-per-user-hour: 1\navg-msg-bytes: 200\n"
                    "blob-uploads-per-day: 0\navg-blob-mb: 0\nretention-days: 1\n")
    _, default = forecast(stack, "--trigger", "connections")
    _, planned = forecast(stack, "--trigger", "connections", "--plan", str(plan))
    assert any("--plan FILE" in n for n in default["capacity"]["notes"])
    assert planned["capacity"]["notes"] == []
    # Observed load replaces users and message rate: same workers, smaller storage tier.
    assert planned["capacity"]["now"]["peak_users"] == default["capacity"]["now"]["peak_users"]
    assert planned["capacity"]["now"]["workers"] == default["capacity"]["now"]["workers"]
    assert planned["capacity"]["now"]["tier"] != default["capacity"]["now"]["tier"]


def test_blob_storage_growth_per_day(stack: Stack) -> None:
    _, doc = forecast(stack, "--trigger", "disk_usage")
    growth = {g["instance"]: g for g in doc["storage_growth"]}
    assert set(growth) == {"growing", "flat"}  # young exports no qpq_blob_bytes
    assert growth["growing"]["bytes_per_day"] == pytest.approx(1e9, rel=0.02)
    assert growth["growing"]["current_bytes"] == pytest.approx(24e9, rel=0.01)
    assert growth["flat"]["bytes_per_day"] == pytest.approx(0, abs=1e6)


def test_unreachable_prometheus_exits_3_with_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["capacity", "forecast", "--prometheus-url", url,
                                 "--timeout", "5"])
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert lines == [f"qpq-ops: error: cannot reach Prometheus at {url}"]


@pytest.mark.parametrize(("args", "message"), [
    (["--lookback", "fortnight"], "--lookback: 'fortnight' is not a duration"),
    (["--lookback", "0d"], "--lookback: '0d' must be longer than 0"),
    (["--horizon", "30"], "--horizon: '30' is not a duration"),
    (["--trigger", "cpu"], "--trigger: 'cpu' is not forecast"),
])
def test_bad_options_exit_64_with_one_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["capacity", "forecast", "--prometheus-url",
                                 "http://127.0.0.1:9", *args])
    assert result.exit_code == 64
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_an_unreadable_calibration_is_a_usage_error(stack: Stack, tmp_path: Path) -> None:
    bad = tmp_path / "calibration.json"
    bad.write_text("{not json")
    for path in (bad, tmp_path / "absent.json"):
        result = runner.invoke(app, ["capacity", "forecast", "--prometheus-url",
                                     stack.prom.url, "--calibration", str(path)])
        assert result.exit_code == 64, result.output
        assert "--calibration" in result.output and "Traceback" not in result.output
