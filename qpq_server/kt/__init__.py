"""Key transparency: an append-only RFC 9162 Merkle log of identity-key publications.

`merkle` (tree hashing, inclusion and consistency proofs, their verification) and
`sth` (signed tree heads, the leaf encoding) are pure: bytes in, bytes out, no I/O.
`log` ties the tree to storage and registers the `kt_*` operations.
"""

from qpq_server.kt.merkle import (
    MerkleTree,
    ProofError,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)
from qpq_server.kt.sth import SignedTreeHead, TreeHeadSigner, kt_leaf, verify_tree_head

__all__ = [
    "MerkleTree",
    "ProofError",
    "SignedTreeHead",
    "TreeHeadSigner",
    "kt_leaf",
    "leaf_hash",
    "node_hash",
    "verify_consistency",
    "verify_inclusion",
    "verify_tree_head",
]
