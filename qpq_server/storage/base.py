"""The storage interface every backend implements (`sqlcipher`, `file`, `postgres`).

All methods are coroutines: backends do blocking work on worker threads (or a native
async driver) so the event loop never blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from qpq_server.errors import ServerBusy

__all__ = ["RESTORE_JOURNAL", "RESTORE_STATE_KEY", "Account", "CommitObserver", "Expected",
           "HealthProbe", "KeyPackage", "KtLeaf", "Storage", "StoredMessage",
           "device_set_changed"]

RESTORE_STATE_KEY = "restore_state"
"""Meta key set by `qpq-ops restore`; the server refuses to start until it reads 'done'."""
RESTORE_JOURNAL = ".qpq-restore-journal"
"""In the data dir while `qpq-ops restore` is placing files: the server refuses to start."""

CommitObserver = Callable[[float], None]
"""Called with the duration in seconds of each durable commit (for the I/O latency metric)."""


@dataclass(frozen=True)
class Account:
    username: str
    password_file: bytes
    setup_version: int
    identity_key: bytes | None
    created_at: float


@dataclass(frozen=True)
class Expected:
    """A compare-and-set condition: the account's identity key (its device set) must
    still be `identity_key` (None: never published) when the write commits, else the
    write raises ServerBusy and changes nothing (another worker or node changed it)."""

    identity_key: bytes | None


@dataclass(frozen=True)
class KeyPackage:
    id: int
    key_package: bytes


@dataclass(frozen=True)
class StoredMessage:
    id: int
    recipient: str
    sender: str
    payload: bytes
    sent_at: float


@dataclass(frozen=True)
class KtLeaf:
    """One key-transparency log entry: the RFC 9162 leaf input, in log order."""

    index: int
    username: str
    leaf: bytes
    created_at: float


def device_set_changed(username: str) -> ServerBusy:
    """The error of a compare-and-set on `username`'s identity key that lost."""
    return ServerBusy(f"the devices of {username!r} changed meanwhile; retry")


class Storage(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create_account(
        self, username: str, password_file: bytes, setup_version: int, now: float
    ) -> None:
        """Raise UserExists when the name is taken."""

    async def get_account(self, username: str) -> Account | None: ...

    async def account_with_meta(self, username: str,
                                key: str) -> tuple[Account | None, str | None]:
        """get_account and get_meta(key) in one read: a request's device lookup needs
        both, and on PostgreSQL each read is a round trip."""

    async def update_password_file(
        self, username: str, password_file: bytes, setup_version: int
    ) -> None: ...

    async def existing_users(self, usernames: Sequence[str]) -> set[str]: ...

    async def set_identity_key(self, username: str, identity_key: bytes,
                               expected: Expected | None = None) -> None: ...

    async def publish_identity_key(
        self, username: str, identity_key: bytes, kt_leaf: bytes, now: float,
        expected: Expected | None = None,
    ) -> int:
        """Set the identity key and append its key-transparency leaf in one durable
        commit; return the leaf's index (0-based, consecutive). With `expected`, only
        if the key is still that (else ServerBusy, nothing written)."""

    async def kt_leaves(self, start: int = 0) -> list[KtLeaf]:
        """Key-transparency leaves from index `start` on, in log order."""

    async def add_key_packages(self, username: str, packages: Sequence[bytes]) -> int:
        """Store one-time key packages; return how many the user now has."""

    async def take_key_package(self, username: str, prefix: bytes = b"") -> KeyPackage | None:
        """Remove and return one key package starting with `prefix` (a device's tag),
        oldest first; each is handed out at most once."""

    async def count_key_packages(self, username: str, prefix: bytes = b"") -> int:
        """How many of the user's key packages start with `prefix`."""

    async def enqueue(
        self, sender: str, recipients: Sequence[str], payload: bytes, now: float
    ) -> list[int]:
        """Durably store one message per recipient; return ids once committed."""

    async def fetch(self, recipient: str, limit: int,
                    max_bytes: int | None = None) -> list[StoredMessage]:
        """Pending messages for recipient, oldest first: at most `limit`, and (when
        `max_bytes` is set) no more payload bytes than that, but always the first one."""

    async def mailbox_bytes(self, recipients: Sequence[str]) -> dict[str, int]:
        """Payload bytes waiting per recipient (recipients with none may be left out)."""

    async def ack(self, recipient: str, message_ids: Sequence[int]) -> int:
        """Delete delivered messages of recipient; return how many were deleted."""

    async def mailbox_count(self, recipient: str) -> int:
        """Messages waiting for one recipient (a federation outbox's depth)."""

    async def enqueue_relayed(self, origin: str, relay_id: int, sender: str,
                              recipients: Sequence[str], payload: bytes,
                              now: float) -> list[int] | None:
        """Store a message a federation peer relayed (one copy per recipient queue: the
        user's devices), unless (origin, relay_id) was stored before: the check and the
        copies commit together, so a retried relay is delivered exactly once. Return
        the message ids, or None for a duplicate."""

    async def forget_relays(self, before: float) -> int:
        """Drop relay ids recorded before `before` (the peer stopped retrying them long
        ago); return how many."""

    async def queue_depth(self) -> int: ...

    async def get_meta(self, key: str) -> str | None: ...

    async def set_meta(self, key: str, value: str) -> None: ...

    async def meta_with_prefix(self, prefix: str) -> dict[str, str]:
        """Every meta key starting with `prefix`, with its value."""


@runtime_checkable
class HealthProbe(Protocol):
    """A backend that can be away (a database server) answers a cheap probe; /readyz
    fails while it raises."""

    async def ping(self) -> None:
        """Raise StorageError unless the backend answers now."""
