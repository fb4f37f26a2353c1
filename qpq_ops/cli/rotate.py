"""`qpq-ops rotate` command group (not built yet)."""

import typer

app = typer.Typer(help="(not built yet)", no_args_is_help=True)
