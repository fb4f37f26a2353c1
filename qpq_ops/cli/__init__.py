"""The `qpq-ops` Typer application: one module per command group, joined here lazily.

A command's module (and the heavy libraries behind it: psycopg, httpx, jinja2, numpy...)
is imported only when that command runs; `COMMANDS` keeps each one's module and the
short help the root `--help` lists, in the order it lists them.
"""

from __future__ import annotations

import sys

import typer

from qpq_ops.cli._lazy import LazyEntry, lazy_group
from qpq_ops.errors import OpsError
from qpq_ops.exit_codes import ExitCode

__all__ = ["COMMANDS", "app", "main"]


# name -> where the command is built and the first paragraph of its help (a test holds
# each line equal to the real command's help).
COMMANDS: dict[str, LazyEntry] = {
    "check-triggers": LazyEntry(
        "qpq_ops.cli.triggers:check_triggers",
        "Evaluate the scaling triggers of the scaling guide (and qpq's worker CPU and\n"
        "federation peers)."),
    "doctor": LazyEntry(
        "qpq_ops.cli.doctor:doctor",
        "Check a qpq box before and after go-live: sysctl, open files, config, /readyz,\n"
        "TLS expiry (warning < 30 days, critical < 7), free disk vs the capacity plan, last\n"
        "backup age, clock offset, whether Prometheus scrapes the server, (backend\n"
        "postgres) that the database answers, its version and schema, and (federation\n"
        "enabled) our federation certificate (CA, expiry, domain, key) and each peer's\n"
        "reachability by one QUIC handshake attempt."),
    "report": LazyEntry(
        "qpq_ops.cli.report:report",
        "Write an HTML report an operator can open anywhere (no network needed)."),
    "restore": LazyEntry(
        "qpq_ops.cli.restore:restore",
        "Restore a backup into the config's data dir, then check it."),
    "capacity": LazyEntry(
        "qpq_ops.cli.capacity:app",
        "Size a qpq deployment: storage, memory, vCPUs, sizing tier and host tuning."),
    "tune": LazyEntry(
        "qpq_ops.cli.tune:app",
        "Host tuning for QUIC: UDP buffers (sysctl) and the open-files limit. Prints the "
        "recommended files; changes nothing unless --write is given."),
    "render": LazyEntry(
        "qpq_ops.cli.render:app",
        "Regenerate the monitoring bundle from the trigger definition: Prometheus alert "
        "and recording rules, promtool tests, the Grafana dashboard and the operations "
        "docs. Paths are relative to --root (default: the qpq checkout around the current "
        "directory). With --check nothing is written and the exit code is 1 when a file "
        "differs."),
    "backup": LazyEntry(
        "qpq_ops.cli.backup:app",
        "Online, consistent backups: the encrypted database (SQLite backup API, never a "
        "raw copy of a live WAL file; with the postgres backend a pg_dump of one "
        "snapshot), the blob store and the OPAQUE setups; secrets only with "
        "--include-secrets. Each archive carries a manifest with sha256 of every member."),
    "rotate": LazyEntry(
        "qpq_ops.cli.rotate:app",
        "Rotate secrets: each command shows its plan with --dry-run, never prints a "
        "secret, and records what/when/fingerprint in DATA_DIR/audit/rotations.jsonl."),
}

app = typer.Typer(
    name="qpq-ops",
    help="Operate a qpq deployment: size it, watch its scaling triggers, tune the host, "
    "back it up, restore it and rotate its keys.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=lazy_group(COMMANDS),
)


@app.callback()
def _root() -> None:
    """No root options: Typer needs a callback to build a group with no eager commands."""


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
