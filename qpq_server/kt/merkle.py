"""RFC 9162 (Certificate Transparency 2.0) Merkle tree hashing, proofs and verification.

leaf hash = SHA-256(0x00 || data), node hash = SHA-256(0x01 || left || right), the empty
tree hashes to SHA-256(""). The tree keeps every complete, aligned subtree hash
(`_levels[k][i]` covers leaves i*2^k .. (i+1)*2^k - 1), so appends are amortised O(1)
and roots and proofs for any tree size cost O(log^2 n) hashes instead of O(n).
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes

__all__ = [
    "HASH_BYTES",
    "MerkleTree",
    "ProofError",
    "leaf_hash",
    "node_hash",
    "verify_consistency",
    "verify_inclusion",
]

HASH_BYTES = 32


class ProofError(Exception):
    """A proof does not verify (or a request for one is out of range)."""


def _sha256(*parts: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    for part in parts:
        digest.update(part)
    return digest.finalize()


def leaf_hash(data: bytes) -> bytes:
    return _sha256(b"\x00", data)


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01", left, right)


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """An append-only tree of leaf hashes; answers for any size up to the current one."""

    def __init__(self) -> None:
        self._levels: list[list[bytes]] = [[]]

    def __len__(self) -> int:
        return len(self._levels[0])

    def append(self, data: bytes) -> int:
        """Add one leaf (its input bytes); return its index."""
        return self.append_hash(leaf_hash(data))

    def append_hash(self, digest: bytes) -> int:
        level = 0
        self._levels[0].append(digest)
        index = len(self._levels[0]) - 1
        while index % 2 == 1:  # this node completed a pair: add the parent
            parent = node_hash(self._levels[level][index - 1], self._levels[level][index])
            level += 1
            if len(self._levels) == level:
                self._levels.append([])
            self._levels[level].append(parent)
            index = len(self._levels[level]) - 1
        return len(self._levels[0]) - 1

    def leaf_hash_at(self, index: int) -> bytes:
        return self._levels[0][index]

    def _subtree(self, start: int, n: int) -> bytes:
        """MTH(D[start:start+n]) for the ranges RFC 9162's recursion visits."""
        if n & (n - 1) == 0 and start % n == 0:
            return self._levels[n.bit_length() - 1][start // n]
        k = _split(n)
        return node_hash(self._subtree(start, k), self._subtree(start + k, n - k))

    def root(self, size: int | None = None) -> bytes:
        size = len(self) if size is None else size
        if not 0 <= size <= len(self):
            raise ProofError(f"tree size {size} is beyond the log ({len(self)} leaves)")
        return _sha256(b"") if size == 0 else self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """PATH(index, D[0:size]) of RFC 9162 section 2.1.3.1."""
        size = len(self) if size is None else size
        if not 0 <= index < size <= len(self):
            raise ProofError(f"no leaf {index} in a tree of size {size}")
        path: list[bytes] = []
        start, n, m = 0, size, index
        while n > 1:
            k = _split(n)
            if m < k:
                path.append(self._subtree(start + k, n - k))
                n = k
            else:
                path.append(self._subtree(start, k))
                start, n, m = start + k, n - k, m - k
        path.reverse()  # the recursion appends from the leaf upwards
        return path

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        """PROOF(first, D[0:second]) of RFC 9162 section 2.1.4.1."""
        second = len(self) if second is None else second
        if not 0 <= first <= second <= len(self):
            raise ProofError(f"no consistency proof from size {first} to {second}")
        if first in (0, second):
            return []
        proof: list[bytes] = []
        start, n, m, whole = 0, second, first, True
        while m != n:
            k = _split(n)
            if m <= k:
                proof.append(self._subtree(start + k, n - k))
                n = k
            else:
                proof.append(self._subtree(start, k))
                start, n, m, whole = start + k, n - k, m - k, False
        if not whole:
            proof.append(self._subtree(start, m))
        proof.reverse()
        return proof


def verify_inclusion(leaf_digest: bytes, index: int, size: int, proof: Sequence[bytes],
                     root: bytes) -> None:
    """RFC 9162 section 2.1.3.2; raise ProofError unless the leaf is in the tree."""
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of size {size}")
    fn, sn, r = index, size - 1, leaf_digest
    for p in proof:
        if len(p) != HASH_BYTES or sn == 0:
            raise ProofError("inclusion proof has the wrong shape")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0 or r != root:
        raise ProofError("inclusion proof does not lead to the signed root")


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """RFC 9162 section 2.1.4.2; raise ProofError unless tree `first` is a prefix of
    tree `second` (the log only grew)."""
    if not 0 <= first <= second:
        raise ProofError(f"tree shrank from {first} to {second} leaves")
    if first == second:
        if proof or first_root != second_root:
            raise ProofError("two different roots for the same tree size")
        return
    if first == 0:
        if proof:
            raise ProofError("consistency proof from the empty tree must be empty")
        return
    path = list(proof)
    if any(len(p) != HASH_BYTES for p in path):
        raise ProofError("consistency proof has the wrong shape")
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    if not path:
        raise ProofError("consistency proof is empty")
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0 or fr != first_root or sr != second_root:
        raise ProofError("consistency proof does not match the two roots")
