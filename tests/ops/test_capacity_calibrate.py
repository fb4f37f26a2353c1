"""capacity calibrate: a real throwaway server on loopback, measured, and the result
feeding capacity plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qpq_ops.calibration import load
from qpq_ops.cli import app

runner = CliRunner()


def test_calibrate_measures_a_throwaway_server_and_plan_uses_it(tmp_path: Path) -> None:
    out = tmp_path / "calibration.json"
    result = runner.invoke(app, ["capacity", "calibrate", "--seconds", "3",
                                 "--idle-connections", "20", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    calibration = load(out)  # what --out wrote is what --json printed
    assert json.loads(out.read_text()) == doc
    # plausible for a Python QUIC server: tens of KB per connection, sub-second CPU costs
    assert 5_000 < calibration.rss_per_connection_bytes < 2_000_000
    assert 10_000_000 < calibration.rss_base_bytes < 1_000_000_000
    for cost in (calibration.cpu_s_per_enqueue, calibration.cpu_s_per_fetch,
                 calibration.cpu_s_per_ack, calibration.cpu_s_per_handshake,
                 calibration.cpu_s_per_login):
        assert 0 < cost < 1
    assert calibration.durable_commits_per_s >= 1
    assert {"cpu", "cores", "kernel", "python", "date"} <= set(calibration.machine)
    plan = runner.invoke(app, ["capacity", "plan", "--users", "1000",
                               "--msgs-per-user-hour", "10", "--avg-msg-bytes", "500",
                               "--blob-uploads-per-day", "0", "--avg-blob-mb", "0",
                               "--retention-days", "30", "--calibration", str(out), "--json"])
    assert plan.exit_code == 0, plan.output
    measured = json.loads(plan.stdout)["measured"]
    assert measured["memory_bytes"] == (calibration.rss_base_bytes * measured["workers"]
                                        + 1000 * calibration.rss_per_connection_bytes)


@pytest.mark.parametrize(("args", "message"), [
    (["--seconds", "1"], "--seconds: must be 2 to 600"),
    (["--seconds", "1e9"], "--seconds: must be 2 to 600"),
    (["--idle-connections", "100000"], "--idle-connections: must be 10 to 5,000"),
    (["--out", "/nonexistent/dir/c.json"], "--out: directory /nonexistent/dir does not exist"),
])
def test_calibrate_bad_options_exit_64(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["capacity", "calibrate", *args])
    assert result.exit_code == 64
    assert message in result.stderr
