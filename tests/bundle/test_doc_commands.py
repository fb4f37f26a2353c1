"""Every `qpq-ops`/`qpq-server` command line the docs and alerts tell operators to run exists.

Walks the real Click command trees: each subcommand must exist and each `--option`
used must be one of that command's options.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from qpq_ops.cli import app as ops_app
from qpq_server.cli import app as server_app

TREES = {"qpq-ops": typer.main.get_command(ops_app),
         "qpq-server": typer.main.get_command(server_app)}
DOCS = ("docs/operations/monitoring.md", "docs/operations/incident-response.md",
        "docs/operations/scaling-guide.md")
_CODE_BLOCK = re.compile(r"```(?:sh)?\n(.*?)```", re.S)
_INLINE = re.compile(r"`((?:qpq-ops|qpq-server) [^`]+)`")


def _commands(text: str) -> list[str]:
    found = [m.group(1) for m in _INLINE.finditer(text)]
    for block in _CODE_BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith(("qpq-ops ", "qpq-server ")):
                found.append(line)
    return found


def _doc_commands(repo: Path) -> list[str]:
    commands: list[str] = []
    for doc in DOCS:
        commands += _commands((repo / doc).read_text())
    alerts = yaml.safe_load((repo / "prometheus/alerts/qpq-alerts.yml").read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            commands += _commands(rule["annotations"]["description"])
    return commands


def _check(line: str) -> None:
    line = re.split(r" && | \| |\s+#", line)[0]
    words = [w.strip("[]") for w in shlex.split(line)]
    command: Any = TREES[words[0]]  # typer's (vendored) click: duck-typed
    rest = words[1:]
    while hasattr(command, "commands"):
        assert rest, f"{line!r}: missing a subcommand"
        name = rest.pop(0)
        sub = command.commands.get(name)
        assert sub is not None, f"{line!r}: no command {name!r}"
        command = sub
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for word in rest:
        if word.startswith("--"):
            assert word.split("=")[0] in options, f"{line!r}: no option {word}"


def test_docs_and_alerts_name_many_commands(repo: Path) -> None:
    assert len(_doc_commands(repo)) >= 20


@pytest.mark.parametrize("line", sorted(set(_doc_commands(Path(__file__).resolve().parents[2]))))
def test_documented_command_line_exists(line: str) -> None:
    _check(line)


def test_checker_rejects_unknown_subcommands_and_options() -> None:
    with pytest.raises(AssertionError, match="no command"):
        _check("qpq-ops backup explode --config x")
    with pytest.raises(AssertionError, match="no option"):
        _check("qpq-ops tune sysctl --force")
