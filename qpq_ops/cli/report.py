"""`qpq-ops report` (in progress)."""

from __future__ import annotations

__all__ = ["report"]


def report() -> None:
    """Write the operator report."""
