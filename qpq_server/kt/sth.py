"""Signed tree heads (Ed25519 over size, timestamp, log root and key-map root) and the
leaf encoding.

Both sides build the exact bytes here: the server to sign and append, the client to
recompute a leaf from the (user, key) it was handed and to check a head's signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from qpq_server.kt.merkle import HASH_BYTES, ProofError

__all__ = ["SignedTreeHead", "TreeHeadSigner", "kt_leaf", "parse_kt_leaf", "verify_tree_head"]

_STH_CONTEXT = b"qpq-kt-sth/2\x00"
_LEAF_CONTEXT = b"qpq-kt-leaf/1\x00"
_RAW_PUBLIC = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def kt_leaf(username: str, identity_key: bytes) -> bytes:
    """The leaf input for one identity-key publication: context, name, key."""
    name = username.encode()
    if len(name) > 255:
        raise ValueError("username too long for a key-transparency leaf")
    return _LEAF_CONTEXT + bytes([len(name)]) + name + identity_key


def parse_kt_leaf(leaf: bytes) -> tuple[str, bytes]:
    """(username, identity key) back out of a leaf input; ValueError when malformed."""
    if not leaf.startswith(_LEAF_CONTEXT) or len(leaf) <= len(_LEAF_CONTEXT):
        raise ValueError("not a qpq key-transparency leaf")
    length = leaf[len(_LEAF_CONTEXT)]
    start = len(_LEAF_CONTEXT) + 1
    return leaf[start:start + length].decode(), leaf[start + length:]


@dataclass(frozen=True)
class SignedTreeHead:
    size: int
    root: bytes
    timestamp_ms: int
    signature: bytes
    map_root: bytes  # root of the current-key map (kt/keymap.py) after these leaves

    def signed_bytes(self) -> bytes:
        return tree_head_bytes(self.size, self.timestamp_ms, self.root, self.map_root)

    def to_wire(self) -> dict[str, Any]:
        return {"size": self.size, "root": self.root, "timestamp_ms": self.timestamp_ms,
                "signature": self.signature, "map_root": self.map_root}

    @classmethod
    def from_wire(cls, value: Any) -> SignedTreeHead:
        """Parse a head from a response map; raise ProofError on a malformed one."""
        try:
            size, root = value["size"], value["root"]
            timestamp_ms, signature = value["timestamp_ms"], value["signature"]
            map_root = value["map_root"]
        except (KeyError, TypeError):
            raise ProofError("malformed signed tree head") from None
        if not (isinstance(size, int) and size >= 0 and isinstance(timestamp_ms, int)
                and isinstance(root, bytes) and len(root) == HASH_BYTES
                and isinstance(map_root, bytes) and len(map_root) == HASH_BYTES
                and isinstance(signature, bytes)):
            raise ProofError("malformed signed tree head")
        return cls(size, root, timestamp_ms, signature, map_root)


def tree_head_bytes(size: int, timestamp_ms: int, root: bytes, map_root: bytes) -> bytes:
    return (_STH_CONTEXT + size.to_bytes(8, "big") + timestamp_ms.to_bytes(8, "big") + root
            + map_root)


class TreeHeadSigner:
    """The server's Ed25519 key (DATA_DIR/kt/signing_key.pem) signing tree heads."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(*_RAW_PUBLIC)

    @classmethod
    def from_pem(cls, pem: bytes) -> TreeHeadSigner:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the key-transparency signing key must be Ed25519")
        return cls(key)

    def sign(self, size: int, root: bytes, timestamp_ms: int,
             map_root: bytes) -> SignedTreeHead:
        signature = self._key.sign(tree_head_bytes(size, timestamp_ms, root, map_root))
        return SignedTreeHead(size, root, timestamp_ms, signature, map_root)


def verify_tree_head(head: SignedTreeHead, public_key: bytes) -> None:
    """Raise ProofError unless `public_key` signed this head."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(head.signature,
                                                              head.signed_bytes())
    except (InvalidSignature, ValueError):
        raise ProofError("tree head signature does not verify with the pinned key") from None
