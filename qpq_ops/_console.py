"""Output helpers shared by every `qpq-ops` command.

- `print_json(obj)`: the JSON document alone on stdout (what `--json` prints).
- `out()` / `err()`: rich consoles for stdout (tables) and stderr (progress, errors).
  They are made per call so that they follow `sys.stdout`/`sys.stderr` as swapped by
  test runners, and drop styling off a terminal. Neither reads markup in plain strings:
  text from data (an action "tighten [rate_limit]", a path, a server's answer) prints as
  is; style goes in `rich.text.Text` (`styled`, `styled_state`, `warn`).
- `fail(message, code)`: one clear line on stderr, then exit with `code`.
- `STATE_STYLE`: the colour of each trigger/check state in tables.
"""

from __future__ import annotations

import json
import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

from qpq_ops.exit_codes import ExitCode

__all__ = ["STATE_STYLE", "err", "fail", "out", "print_json", "styled", "styled_state", "warn"]

STATE_STYLE = {
    "ok": "green",
    "warning": "yellow",
    "critical": "bold red",
    "no-data": "magenta",
    "skipped": "dim",
}


def out() -> Console:
    return Console(file=sys.stdout, soft_wrap=False, markup=False)


def err() -> Console:
    return Console(file=sys.stderr, soft_wrap=True, markup=False)


def print_json(obj: object) -> None:
    """Write `obj` as indented JSON, alone, on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def styled(text: str, style: str) -> Text:
    """`text` in `style`, never read as markup."""
    return Text(text, style=style)


def styled_state(state: str) -> Text:
    """A state word, coloured by `STATE_STYLE`."""
    return Text(state, style=STATE_STYLE.get(state, ""))


def warn(message: str, label: str = "warning:", style: str = "yellow") -> None:
    """`warning: message` on stderr, the message printed as is."""
    err().print(Text(label + " ", style=style) + Text(message), highlight=False)


def fail(message: str, code: ExitCode = ExitCode.USAGE) -> NoReturn:
    """Print `qpq-ops: error: message` as one line on stderr and exit with `code`."""
    line = " ".join(message.split())
    err().print(Text("qpq-ops: error: ", style="bold red") + Text(line), highlight=False)
    raise typer.Exit(int(code))
