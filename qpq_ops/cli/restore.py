"""`qpq-ops restore` (not built yet)."""

import typer


def restore() -> None:
    """(not built yet)"""
    raise typer.Exit(3)
