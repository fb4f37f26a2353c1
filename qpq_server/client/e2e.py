"""End-to-end encryption of message payloads (the server only ever sees the output).

A fresh content key encrypts the content once (ChaCha20-Poly1305); for each recipient
the content key is wrapped under HKDF-SHA256 of ephemeral X25519 exchanges with the
recipient's identity key (verified against the key-transparency log) and, when one was
available, a one-time key package (forward secrecy), as in X3DH. One-time packages are
not in the log, so they never stand alone: a package substituted by a malicious server
yields a wrap it still cannot open without the identity key's private half. The
sender's name is bound as associated data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qpq_server.client.errors import DecryptError

__all__ = ["DecryptError", "RecipientKey", "open_envelope", "public_bytes", "seal"]

_VERSION = 2
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


@dataclass(frozen=True)
class RecipientKey:
    username: str
    identity_key: bytes  # 32-byte X25519, checked against the key-transparency log
    one_time_key: bytes | None = None  # 32-byte X25519 key package, when one was left


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(*_RAW)


def _wrap_key(shared: bytes, epk: bytes, ik: bytes, opk: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"qpq/2 wrap|" + epk + ik + opk).derive(shared)


def seal(content: dict[str, Any], sender: str, recipients: Sequence[RecipientKey]) -> bytes:
    content_key = ChaCha20Poly1305.generate_key()
    aad = b"qpq/1|" + sender.encode()
    nonce = os.urandom(12)
    body = ChaCha20Poly1305(content_key).encrypt(
        nonce, msgpack.packb(content, use_bin_type=True), aad)
    keys: dict[str, dict[str, bytes]] = {}
    for recipient in recipients:
        ephemeral = X25519PrivateKey.generate()
        epk = public_bytes(ephemeral)
        ik, opk = recipient.identity_key, recipient.one_time_key or b""
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(ik))
        if opk:
            shared += ephemeral.exchange(X25519PublicKey.from_public_bytes(opk))
        wrap_nonce = os.urandom(12)
        wrapped = ChaCha20Poly1305(_wrap_key(shared, epk, ik, opk)).encrypt(
            wrap_nonce, content_key, aad)
        keys[recipient.username] = {"epk": epk, "ik": ik, "opk": opk,
                                    "n": wrap_nonce, "w": wrapped}
    return bytes(msgpack.packb({"v": _VERSION, "from": sender, "n": nonce, "ct": body,
                                "k": keys}, use_bin_type=True))


def open_envelope(envelope: bytes, me: str,
                  private_key_for: Callable[[bytes], X25519PrivateKey | None],
                  ) -> tuple[str, bytes, dict[str, Any]]:
    """Return (sender, one-time key used or b"", content)."""
    try:
        data = msgpack.unpackb(envelope, raw=False)
        sender, nonce, body, entry = data["from"], data["n"], data["ct"], data["k"][me]
        epk, ik, opk = entry["epk"], entry["ik"], entry["opk"]
        wrap_nonce, wrapped = entry["n"], entry["w"]
        if data.get("v") != _VERSION or not isinstance(sender, str):
            raise DecryptError("unsupported envelope version")
        if not all(isinstance(b, bytes) for b in (epk, ik, opk, wrap_nonce, wrapped)):
            raise DecryptError("malformed envelope: wrong field types")
    except (KeyError, TypeError, ValueError, msgpack.ExtraData) as exc:
        raise DecryptError(f"malformed envelope: {exc}") from None
    identity = private_key_for(ik)
    one_time = private_key_for(opk) if opk else None
    if identity is None or (opk and one_time is None):
        raise DecryptError("no private key for the keys this message was sent to")
    aad = b"qpq/1|" + sender.encode()
    try:
        peer = X25519PublicKey.from_public_bytes(epk)
        shared = identity.exchange(peer)
        if one_time is not None:
            shared += one_time.exchange(peer)
        content_key = ChaCha20Poly1305(_wrap_key(shared, epk, ik, opk)).decrypt(
            wrap_nonce, wrapped, aad)
        content = msgpack.unpackb(ChaCha20Poly1305(content_key).decrypt(nonce, body, aad),
                                  raw=False)
    except (InvalidTag, ValueError) as exc:
        raise DecryptError("message failed authentication (tampered or wrong key)") from exc
    if not isinstance(content, dict):
        raise DecryptError("malformed content")
    return sender, opk, content
