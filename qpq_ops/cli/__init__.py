"""The `qpq-ops` Typer application: one module per command group, joined here."""

from __future__ import annotations

import sys

import typer

from qpq_ops.cli import (
    backup,
    capacity,
    doctor,
    forecast,
    render,
    report,
    restore,
    rotate,
    triggers,
    tune,
)
from qpq_ops.errors import OpsError
from qpq_ops.exit_codes import ExitCode

__all__ = ["app", "main"]

app = typer.Typer(
    name="qpq-ops",
    help="Operate a qpq deployment: size it, watch its scaling triggers, tune the host, "
    "back it up, restore it and rotate its keys.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
capacity.app.command("forecast")(forecast.forecast)
app.add_typer(capacity.app, name="capacity")
app.command("check-triggers")(triggers.check_triggers)
app.add_typer(tune.app, name="tune")
app.command("doctor")(doctor.doctor)
app.command("report")(report.report)
app.add_typer(render.app, name="render")
app.add_typer(backup.app, name="backup")
app.command("restore")(restore.restore)
app.add_typer(rotate.app, name="rotate")


def main() -> None:
    """Run the CLI with DESIGN.md's exit codes: usage errors exit 64, not click's 2
    (2 means "critical found" to scripts that call qpq-ops).

    An error no command handled is one line on stderr, never a traceback: an `OpsError`
    exits with its own code, anything else with 3 ("could not complete"), so that a
    caller such as the qpq_rotate role never reads a crash as 1 ("warnings").
    """
    # typer vendors click; its UsageError is what a bad option or argument raises.
    from typer._click.exceptions import ClickException, UsageError

    try:
        code = app(standalone_mode=False)
    except UsageError as exc:
        exc.show()
        sys.exit(ExitCode.USAGE)
    except ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        sys.exit(130)
    except OpsError as exc:
        _one_line(str(exc))
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug: say what broke in one line, exit 3
        _one_line(f"unexpected {type(exc).__name__}: {exc}")
        sys.exit(ExitCode.CANNOT_EVALUATE)
    sys.exit(code if isinstance(code, int) else 0)


def _one_line(message: str) -> None:
    line = " ".join(message.split()) or "no detail"
    print(f"qpq-ops: error: {line[:500]}", file=sys.stderr)
