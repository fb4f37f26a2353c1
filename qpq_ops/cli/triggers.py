"""`qpq-ops check-triggers` (not built yet)."""

import typer


def check_triggers() -> None:
    """(not built yet)"""
    raise typer.Exit(3)
