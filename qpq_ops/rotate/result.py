"""What every rotation returns: what it did (or would do), and what the operator does next."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RotationResult"]


@dataclass(frozen=True)
class RotationResult:
    kind: str
    action: str                        # rotate | finish | stage
    dry_run: bool
    fingerprint: str = ""              # of the new secret (never the secret)
    previous_fingerprint: str = ""
    steps: tuple[str, ...] = ()        # done, or that would be done with --dry-run
    next_steps: tuple[str, ...] = ()   # for the operator (and peers)
    reload: str = ""                   # how the server was told, or why it was not
    warnings: tuple[str, ...] = ()
