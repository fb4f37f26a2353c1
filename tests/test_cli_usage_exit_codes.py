"""Usage errors of every CLI exit with DESIGN.md's 64, never click's 2 ("critical")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("args", [
    ["--no-such-option"],
    ["check-triggers", "--sample", "abc", "--metrics-url", "http://127.0.0.1:1/metrics"],
    ["tune", "no-such-kind"],
    ["capacity", "plan", "--users", "-5", "--msgs-per-user-hour", "1", "--avg-msg-bytes", "1",
     "--blob-uploads-per-day", "0", "--avg-blob-mb", "0", "--retention-days", "1"],
    ["capacity", "forecast", "--prometheus-url", "http://127.0.0.1:1", "--timeout", "abc"],
    ["capacity", "forecast", "--prometheus-url", "http://127.0.0.1:1", "--lookback", "14x"],
    ["report", "--prometheus-url", "http://127.0.0.1:1", "--out", "r.html", "--horizon", "soon"],
])
def test_qpq_ops_usage_errors_exit_64(args: list[str]) -> None:
    result = subprocess.run([str(BIN / "qpq-ops"), *args], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 64, result.stderr
    assert "Traceback" not in result.stderr


def test_qpq_ops_help_exits_0() -> None:
    result = subprocess.run([str(BIN / "qpq-ops"), "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "check-triggers" in result.stdout
