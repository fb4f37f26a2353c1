"""The `qpq-ops` Typer application: one module per command group, joined here."""

from __future__ import annotations

import typer

from qpq_ops.cli import backup, capacity, doctor, render, restore, rotate, triggers, tune

__all__ = ["app", "main"]

app = typer.Typer(
    name="qpq-ops",
    help="Operate a qpq deployment: size it, watch its scaling triggers, tune the host, "
    "back it up, restore it and rotate its keys.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(capacity.app, name="capacity")
app.command("check-triggers")(triggers.check_triggers)
app.add_typer(tune.app, name="tune")
app.command("doctor")(doctor.doctor)
app.add_typer(render.app, name="render")
app.add_typer(backup.app, name="backup")
app.command("restore")(restore.restore)
app.add_typer(rotate.app, name="rotate")


def main() -> None:
    app()
