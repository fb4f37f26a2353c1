"""The lazily-loading `qpq-ops` root (issue 17) shows what the eager one showed.

The root `--help` lists each command from `COMMANDS` without importing it; these tests
hold each listed line equal to the real command's help (drift fails here), the commands
in their documented order, and a command run through the lazy root the same as built
directly. What gets imported is pinned in tests/test_import_boundaries.py.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from typing import Any

import pytest
import typer.main

from qpq_ops.cli import COMMANDS, app
from qpq_ops.cli.capacity import FORECAST

ORDER = ["check-triggers", "doctor", "report", "restore", "capacity", "tune", "render",
         "backup", "rotate"]


def _first_paragraph(text: str | None) -> str:
    return inspect.cleandoc(text or "").split("\n\n")[0]


def test_every_listed_help_line_is_the_real_commands_first_paragraph() -> None:
    root: Any = typer.main.get_command(app)
    for name, entry in COMMANDS.items():
        real = root.commands[name]  # builds it: imports its module
        assert real.name == name
        assert entry.short == _first_paragraph(real.short_help or real.help), name


def test_the_root_lists_every_command_in_order_and_builds_them_on_demand() -> None:
    root: Any = typer.main.get_command(app)
    ctx = root.make_context("qpq-ops", ["--help"], resilient_parsing=True)
    assert root.list_commands(ctx) == ORDER
    capacity = root.commands["capacity"]
    assert list(capacity.commands) == ["plan", "calibrate", "forecast"]


def test_capacity_forecast_help_line_is_the_real_commands_first_paragraph() -> None:
    capacity: Any = typer.main.get_command(app).commands["capacity"]  # type: ignore[attr-defined]
    real = capacity.commands["forecast"]
    assert FORECAST.short == _first_paragraph(real.help)


def _root_help(load_first: bool, capsys: pytest.CaptureFixture[str]) -> str:
    root: Any = typer.main.get_command(app)
    if load_first:
        for name in ORDER:
            root.commands[name]  # builds it: the listing then uses it
    capsys.readouterr()
    with root.make_context("qpq-ops", [], resilient_parsing=True) as ctx:
        text: str = root.get_help(ctx)
    return text + capsys.readouterr().out  # typer's rich help prints instead of returning


def test_root_help_is_the_same_before_and_after_the_commands_are_loaded(
        capsys: pytest.CaptureFixture[str]) -> None:
    lazy = _root_help(False, capsys)
    assert all(name in lazy for name in ORDER)
    assert lazy == _root_help(True, capsys)


def test_a_typo_still_gets_a_suggestion_and_exit_64() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from qpq_ops.cli import main; main()", "tun"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 64
    assert "No such command 'tun'. Did you mean 'tune'?" in result.stderr
