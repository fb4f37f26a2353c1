"""The key-transparency log as the server runs it: storage-backed, signed, queryable.

Identity-key publications are appended through `KtLog.publish` (storage commits the
key and its leaf together; the in-memory tree follows the stored order). Operations
need only the access token: the log is public to everyone allowed to talk to the
server. `kt_ops` gives the app `kt_head`, `kt_lookup`, `kt_inclusion` and
`kt_consistency` to register; `get_keys` answers carry the same proof (`KtLog.proof_for`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qpq_server.errors import BadRequest, ConfigError, NotFound, UnknownUser
from qpq_server.identity import IDENTITY_BYTES
from qpq_server.kt.keymap import KeyMap
from qpq_server.kt.merkle import MerkleTree, leaf_hash
from qpq_server.kt.sth import SignedTreeHead, TreeHeadSigner, kt_leaf, parse_kt_leaf
from qpq_server.protocol import validate as v
from qpq_server.protocol.dispatch import ConnectionState, Handler
from qpq_server.storage.base import Expected, Storage

__all__ = ["KtLog", "kt_ops", "load_signer"]

MAX_DEVICE_SET = 64  # identities in one logged device set (well above [limits] max_devices)



def load_signer(path: Path) -> TreeHeadSigner:
    try:
        return TreeHeadSigner.from_pem(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read key-transparency signing key {path}: "
                          f"{exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not an Ed25519 PKCS8 PEM key ({exc})") from None


class KtLog:
    def __init__(self, storage: Storage, signer: TreeHeadSigner,
                 on_size: Callable[[int], None] | None = None,
                 clock: Callable[[], float] = time.time, shared: bool = False) -> None:
        self._storage = storage
        self._shared = shared  # other processes append to the same stored log
        self._signer = signer
        self._on_size = on_size
        self._clock = clock
        self._tree = MerkleTree()
        self._index_of: dict[bytes, int] = {}  # leaf hash -> latest index
        self._current: dict[str, bytes] = {}  # username -> latest identity
        self._map = KeyMap()
        self._head: SignedTreeHead | None = None
        self._lock = asyncio.Lock()

    @property
    def size(self) -> int:
        return len(self._tree)

    @property
    def public_key(self) -> bytes:
        return self._signer.public_key

    async def load(self) -> None:
        async with self._lock:
            await self._catch_up()

    async def refresh(self) -> None:
        """Take in leaves other processes appended (worker processes, other nodes on one
        database) before answering from the in-memory tree. A log only this process
        writes is complete already: no storage read on the lookup path then."""
        if not self._shared:
            return
        async with self._lock:
            await self._catch_up()

    async def _catch_up(self) -> None:
        """Append whatever storage holds beyond our tree (in stored order), and move the
        current-key map along (built whole on the first load, then path by path)."""
        first = len(self._tree) == 0
        for entry in await self._storage.kt_leaves(start=len(self._tree)):
            if entry.index != len(self._tree):
                raise ConfigError(f"key-transparency log has a gap at leaf {len(self._tree)}")
            index = self._tree.append(entry.leaf)
            self._index_of[self._tree.leaf_hash_at(index)] = index
            username, identity = parse_kt_leaf(entry.leaf)
            self._current[username] = identity
            if not first:
                self._map.update(username, identity)
        if first:
            self._map = KeyMap(self._current)
        if self._on_size is not None:
            self._on_size(len(self._tree))

    async def publish(self, username: str, identity_key: bytes,
                      expected: Expected | None = None) -> int:
        """Log and set `identity_key` (with `expected`: only if the key is still that,
        else ServerBusy and nothing logged)."""
        async with self._lock:
            index = await self._storage.publish_identity_key(
                username, identity_key, kt_leaf(username, identity_key), self._clock(),
                expected=expected)
            await self._catch_up()
            return index

    def head(self) -> SignedTreeHead:
        """The head for the current size, signed once per size."""
        size = len(self._tree)
        if self._head is None or self._head.size != size:
            self._head = self._signer.sign(size, self._tree.root(size),
                                           int(self._clock() * 1000), self._map.root)
        return self._head

    def proof_for(self, username: str, identity_key: bytes) -> dict[str, Any] | None:
        """Inclusion proof of (username, key) in the current head, or None if not logged."""
        index = self._index_of.get(leaf_hash(kt_leaf(username, identity_key)))
        if index is None:
            return None
        head = self.head()
        current = self._current.get(username) == identity_key
        return {"leaf_index": index, "audit_path": self._tree.inclusion_proof(index, head.size),
                "head": head.to_wire(),
                # proves "current": only for the key the map holds for the user now
                "map_path": self._map.proof(username) if current else None}

    def consistency(self, first: int, second: int) -> list[bytes]:
        return self._tree.consistency_proof(first, second)


def kt_ops(log: KtLog, storage: Storage) -> Mapping[str, Handler]:
    """The log's public operations (the access token is enough to read it)."""

    async def kt_head(request: dict[str, Any], conn: ConnectionState) -> dict[str, Any]:
        await log.refresh()
        return {"head": log.head().to_wire(), "public_key": log.public_key}

    async def kt_lookup(request: dict[str, Any], conn: ConnectionState) -> dict[str, Any]:
        username = v.get_username(request)
        await log.refresh()
        account = await storage.get_account(username)
        if account is None:
            raise UnknownUser(f"no user {username!r}")
        if account.identity_key is None:
            raise NotFound(f"user {username!r} has not published keys yet")
        proof = log.proof_for(username, account.identity_key)
        if proof is None:
            raise NotFound(f"the key of {username!r} is not in the log yet")
        return {"identity_key": account.identity_key, **proof}

    async def kt_inclusion(request: dict[str, Any], conn: ConnectionState) -> dict[str, Any]:
        username = v.get_username(request)
        key = v.get_bytes(request, "identity_key",  # one device's key, or a device set
                          max_len=IDENTITY_BYTES * MAX_DEVICE_SET, min_len=IDENTITY_BYTES)
        await log.refresh()
        proof = log.proof_for(username, key)
        if proof is None:
            raise NotFound(f"no leaf for this key of {username!r} in the log")
        return proof

    async def kt_consistency(request: dict[str, Any],
                             conn: ConnectionState) -> dict[str, Any]:
        await log.refresh()
        size = log.size
        first = v.get_int(request, "first", lo=0, hi=2**62)
        second = v.get_int(request, "second", lo=0, hi=2**62)
        if not first <= second <= size:
            raise BadRequest(f"need 0 <= first <= second <= {size} (the log's size)")
        return {"proof": log.consistency(first, second)}

    return {"kt_head": kt_head, "kt_lookup": kt_lookup, "kt_inclusion": kt_inclusion,
            "kt_consistency": kt_consistency}
