"""A fault-injecting wrapper at the `Storage` interface: the Nth write fails.

Reads pass straight through. Every method that changes stored state counts as one
write; arming the wrapper with `fail_nth(n)` makes the n-th write from then on raise a
`StorageError` *before* it reaches the real backend (a failed commit stores nothing).
"""

from __future__ import annotations

from typing import Any

from qpq_server.errors import StorageError
from qpq_server.storage.base import Storage

WRITES = frozenset({
    "create_account", "update_password_file", "set_identity_key", "publish_identity_key",
    "add_key_packages", "take_key_package", "enqueue", "ack", "set_meta",
})


class FaultyStorage:
    def __init__(self, inner: Storage) -> None:
        self._inner = inner
        self._countdown: int | None = None
        self.writes = 0
        self.injected = 0

    def fail_nth(self, n: int | None) -> None:
        """Fail the n-th write from now (None: disarm)."""
        self._countdown = n

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in WRITES:
            return attr

        async def write(*args: Any, **kwargs: Any) -> Any:
            self.writes += 1
            if self._countdown is not None:
                self._countdown -= 1
                if self._countdown == 0:
                    self._countdown = None
                    self.injected += 1
                    raise StorageError(f"injected fault in {name} (write {self.writes})")
            return await attr(*args, **kwargs)

        return write
