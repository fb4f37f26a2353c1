"""The current identity of every user, as a sparse Merkle tree whose root the signed
tree head commits to: a lookup then proves "this is bob's *current* key", not only
"this key is somewhere in the log" (as CONIKS and Google Key Transparency do).

A user sits at the 256-bit position `SHA-256("qpq-kt-map/1\\0" || username)`. A subtree
hashes to EMPTY (32 zero bytes) when it holds nobody, to its one leaf's hash when it
holds one user (so paths stop where a user is alone, about log2(users) deep), else to
`SHA-256(0x03 || left || right)`. A leaf hashes as `SHA-256(0x02 || position ||
identity)`. Leaf, node and empty never collide, and a leaf names its full position, so
one root proves at most one identity per user.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Mapping, Sequence

from qpq_server.kt.merkle import HASH_BYTES, ProofError

__all__ = ["EMPTY", "KeyMap", "map_leaf_hash", "map_position", "verify_map_inclusion"]

EMPTY = bytes(HASH_BYTES)
_BITS = 256


def _sha256(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()  # hashlib: the map rehashes a lot


def map_position(username: str) -> bytes:
    return _sha256(b"qpq-kt-map/1\x00", username.encode())


def map_leaf_hash(username: str, identity: bytes) -> bytes:
    return _sha256(b"\x02", map_position(username), identity)


def _node(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x03", left, right)


class KeyMap:
    """Every non-empty node is kept, so proofs are lookups and an update rehashes only
    its own path (users are never removed, so subtrees only ever gain members)."""

    def __init__(self, current: Mapping[str, bytes] | None = None) -> None:
        self._leaves = sorted((int.from_bytes(map_position(u), "big"), map_leaf_hash(u, k))
                              for u, k in (current or {}).items())
        self._keys = [p for p, _ in self._leaves]
        self._nodes: dict[tuple[int, int], bytes] = {}
        self._alone: set[tuple[int, int]] = set()
        self.root = self._build(0, len(self._leaves), 0, 0)

    def __len__(self) -> int:
        return len(self._keys)

    def update(self, username: str, identity: bytes) -> None:
        """Set the user's current identity and rehash the path to the root."""
        position = int.from_bytes(map_position(username), "big")
        leaf = map_leaf_hash(username, identity)
        i = bisect_left(self._keys, position)
        if i < len(self._keys) and self._keys[i] == position:
            self._leaves[i] = (position, leaf)
        else:
            self._keys.insert(i, position)
            self._leaves.insert(i, (position, leaf))
        self.root = self._refresh(0, len(self._keys), 0, 0, position)

    def _split(self, lo: int, hi: int, depth: int, prefix: int) -> int:
        return bisect_left(self._keys, ((prefix << 1) | 1) << (_BITS - depth - 1), lo, hi)

    def _refresh(self, lo: int, hi: int, depth: int, prefix: int, position: int) -> bytes:
        if hi - lo <= 1:
            return self._build(lo, hi, depth, prefix)
        self._alone.discard((depth, prefix))
        mid, child = self._split(lo, hi, depth, prefix), prefix << 1
        if (position >> (_BITS - depth - 1)) & 1:
            left = self._cached(lo, mid, depth + 1, child)
            right = self._refresh(mid, hi, depth + 1, child | 1, position)
        else:
            left = self._refresh(lo, mid, depth + 1, child, position)
            right = self._cached(mid, hi, depth + 1, child | 1)
        digest = self._nodes[(depth, prefix)] = _node(left, right)
        return digest

    def _cached(self, lo: int, hi: int, depth: int, prefix: int) -> bytes:
        """A subtree off the updated path: unchanged, so cached, unless it holds at most
        one user (then it may not have had a node of its own yet; cheap to build)."""
        return self._build(lo, hi, depth, prefix) if hi - lo <= 1 else \
            self._nodes[(depth, prefix)]

    def _build(self, lo: int, hi: int, depth: int, prefix: int) -> bytes:
        if hi - lo == 0:
            return EMPTY
        if hi - lo == 1:
            digest = self._leaves[lo][1]
            self._alone.add((depth, prefix))
        else:
            mid, child = self._split(lo, hi, depth, prefix), prefix << 1
            digest = _node(self._build(lo, mid, depth + 1, child),
                           self._build(mid, hi, depth + 1, child | 1))
        self._nodes[(depth, prefix)] = digest
        return digest

    def proof(self, username: str) -> list[bytes]:
        """Siblings from the root down to where the user is alone; ProofError when the
        user has no key in the map."""
        position = int.from_bytes(map_position(username), "big")
        i = bisect_left(self._keys, position)
        if i == len(self._keys) or self._keys[i] != position:
            raise ProofError(f"no current key for {username!r} in the map")
        path: list[bytes] = []
        depth = 0
        while (depth, position >> (_BITS - depth)) not in self._alone:
            sibling = (position >> (_BITS - depth - 1)) ^ 1
            path.append(self._nodes.get((depth + 1, sibling), EMPTY))
            depth += 1
        return path


def verify_map_inclusion(username: str, identity: bytes, path: Sequence[bytes],
                         root: bytes) -> None:
    """Raise ProofError unless `identity` is the user's entry under `root`."""
    if len(path) > _BITS or any(not isinstance(p, bytes) or len(p) != HASH_BYTES
                                for p in path):
        raise ProofError("map proof has the wrong shape")
    position = int.from_bytes(map_position(username), "big")
    digest = map_leaf_hash(username, identity)
    for depth in range(len(path) - 1, -1, -1):
        if (position >> (_BITS - depth - 1)) & 1:
            digest = _node(path[depth], digest)
        else:
            digest = _node(digest, path[depth])
    if digest != root:
        raise ProofError("the identity is not the user's current key under the signed map "
                         "root")
