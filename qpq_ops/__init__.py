"""qpq-ops: the operator's toolkit for qpq (sizing, triggers, tuning, backup, rotation)."""

__all__: list[str] = []
