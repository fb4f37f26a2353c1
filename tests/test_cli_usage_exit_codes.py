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


# A command that lets an error through: `tune sysctl` with its renderer made to raise.
CRASH = """
import sys
import qpq_ops.cli.tune as tune
from qpq_ops.errors import ArchiveDamaged

def boom():
    raise {error}

tune.render_sysctl_conf = boom
sys.argv = ["qpq-ops", "tune", "sysctl"]
from qpq_ops.cli import main
main()
"""


@pytest.mark.parametrize(("error", "code", "line"), [
    ("RuntimeError('disk\\nexploded')", 3, "qpq-ops: error: unexpected RuntimeError: disk exploded"),
    ("KeyError('x')", 3, "qpq-ops: error: unexpected KeyError: 'x'"),
    ("ArchiveDamaged('member db truncated')", 2, "qpq-ops: error: member db truncated"),
])
def test_qpq_ops_uncaught_errors_are_one_line_with_their_exit_code(
        error: str, code: int, line: str) -> None:
    """Never 1 (a caller would read "warnings") and never a traceback (issue 13)."""
    result = subprocess.run([sys.executable, "-c", CRASH.format(error=error)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stderr
    assert result.stderr == line + "\n"
