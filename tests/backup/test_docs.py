"""Every qpq-ops command line in backup-restore.md and key-rotation.md exists, with its
options (walks the real Click tree, so a renamed option breaks this test)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main

from qpq_ops.cli import app

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("docs/operations/backup-restore.md", "docs/operations/key-rotation.md")
TREE = typer.main.get_command(app)
_INLINE = re.compile(r"`(qpq-ops [^`]+)`")
_BLOCK = re.compile(r"```(?:sh)?\n(.*?)```", re.S)


def _lines() -> list[str]:
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        found += [" ".join(m.group(1).split()) for m in _INLINE.finditer(text)]
        for block in _BLOCK.findall(text):
            for line in block.splitlines():
                line = re.sub(r"^(\w+=\S+ )+", "", line.strip())  # VAR=... prefixes
                if line.startswith("qpq-ops "):
                    found.append(line)
    return sorted(set(found))


def test_the_docs_show_many_commands() -> None:
    assert len(_lines()) >= 10


@pytest.mark.parametrize("line", _lines())
def test_documented_command_exists(line: str) -> None:
    words = [w.strip("[]") for w in shlex.split(re.split(r"\s+#", line)[0])][1:]
    command: Any = TREE
    while hasattr(command, "commands") and words:
        name = words.pop(0)
        if name.isupper():
            return  # `qpq-ops rotate KIND ...`: a placeholder, each KIND is shown too
        assert name in command.commands, f"{line!r}: no command {name!r}"
        command = command.commands[name]
    options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    for word in words:
        if word.startswith("--"):
            assert word.split("=")[0] in options, f"{line!r}: no option {word}"
