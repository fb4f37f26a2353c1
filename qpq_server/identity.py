"""A user's published identity and the signatures made with it (server and client).

An identity is 64 bytes, `X25519 public (32) || Ed25519 public (32)`: the X25519 half
takes part in every X3DH exchange, the Ed25519 half signs the user's medium-term
signed prekey and vouches for a successor identity. The whole bundle is what the
key-transparency log records, so one verified leaf covers both halves.

The signed messages carry a context string each, so a signature made for one purpose
never verifies for another.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "IDENTITY_BYTES",
    "PREKEY_BYTES",
    "SIGNATURE_BYTES",
    "identity_change_message",
    "signed_prekey_message",
    "split_identity",
    "verify_signature",
]

IDENTITY_BYTES = 64
PREKEY_BYTES = 32
SIGNATURE_BYTES = 64

_SPK_CONTEXT = b"qpq-spk/1\x00"
_CHANGE_CONTEXT = b"qpq-identity-change/1\x00"


def split_identity(identity: bytes) -> tuple[bytes, bytes]:
    """(X25519 public, Ed25519 public); ValueError when the bundle is malformed."""
    if len(identity) != IDENTITY_BYTES:
        raise ValueError(f"an identity key is {IDENTITY_BYTES} bytes, not {len(identity)}")
    return identity[:32], identity[32:]


def signed_prekey_message(identity: bytes, prekey: bytes) -> bytes:
    """What the identity signs to vouch for a signed prekey (bound to that identity)."""
    return _SPK_CONTEXT + identity + prekey


def identity_change_message(username: str, old: bytes, new: bytes) -> bytes:
    """What the previous identity signs to hand the account over to a new one."""
    name = username.encode()
    return _CHANGE_CONTEXT + bytes([len(name)]) + name + old + new


def verify_signature(identity: bytes, signature: bytes, message: bytes) -> bool:
    """True when the identity's Ed25519 half signed `message`."""
    try:
        Ed25519PublicKey.from_public_bytes(split_identity(identity)[1]).verify(
            signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
