"""`qpq-ops doctor` (not built yet)."""

import typer


def doctor() -> None:
    """(not built yet)"""
    raise typer.Exit(3)
