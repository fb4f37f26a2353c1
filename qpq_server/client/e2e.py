"""End-to-end encryption of message payloads (the server only ever sees the output).

A fresh content key encrypts the content once (ChaCha20-Poly1305). For each recipient
the content key is wrapped under a key agreed as in Signal's X3DH:

    DH1 = DH(IK_sender, SPK_recipient)   sender authentication: only the holder of the
                                         sender's logged identity key can compute it
    DH2 = DH(EK, IK_recipient)           the recipient's logged identity
    DH3 = DH(EK, SPK_recipient)          the medium-term prekey the identity signed
    DH4 = DH(EK, OPK_recipient)          a one-time package, when one was left
    wrap key = HKDF-SHA256(0xFF*32 || DH1 || DH2 || DH3 [|| DH4], info = all public keys)

The header (version, sender name, sender identity, time) is associated data of the
body, and every wrap is bound to the header, the body's hash and the recipient's name,
so neither the server nor a co-recipient (who knows the content key) can swap the body
under someone else's wrap. The recipient opens a wrap only with the sender identity it
verified itself (key transparency and its pin), never with the one the envelope names.
"""

from __future__ import annotations

import hashlib
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

from qpq_server.client.errors import DecryptError, ForgedSender
from qpq_server.identity import IDENTITY_BYTES, split_identity

__all__ = ["DecryptError", "Envelope", "ForgedSender", "RecipientKey", "open_envelope",
           "parse_envelope", "public_bytes", "seal"]

_VERSION = 3
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw
_X3DH_PAD = b"\xff" * 32  # X3DH's F: keeps the input apart from any X25519 output alone


@dataclass(frozen=True)
class RecipientKey:
    username: str
    identity: bytes  # 64-byte identity bundle, verified against the key-transparency log
    signed_prekey: bytes  # 32-byte X25519, its signature by `identity` already checked
    one_time_key: bytes | None = None  # 32-byte X25519 key package, when one was left


@dataclass(frozen=True)
class Envelope:
    """A parsed envelope for one recipient; nothing in it is authenticated yet."""

    sender: str
    sender_identity: bytes
    sent_at_ms: int
    replay_id: bytes  # this recipient's ephemeral key: fresh per message and recipient
    _header: bytes
    _nonce: bytes
    _body: bytes
    _entry: dict[str, bytes]


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(*_RAW)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    return private.exchange(X25519PublicKey.from_public_bytes(public))


def _wrap_key(secret: bytes, *public: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"qpq/3 x3dh|" + b"".join(public)).derive(_X3DH_PAD + secret)


def _wrap_aad(header: bytes, nonce: bytes, body: bytes, recipient: str) -> bytes:
    body_hash = hashlib.sha256(nonce + body).digest()
    return bytes(msgpack.packb([b"qpq/3 wrap", header, body_hash, recipient],
                               use_bin_type=True))


def seal(content: dict[str, Any], sender: str, sender_dh: X25519PrivateKey,
         sender_identity: bytes, recipients: Sequence[RecipientKey],
         now_ms: int) -> bytes:
    header = bytes(msgpack.packb([_VERSION, sender, sender_identity, now_ms],
                                 use_bin_type=True))
    content_key = ChaCha20Poly1305.generate_key()
    nonce = os.urandom(12)
    body = ChaCha20Poly1305(content_key).encrypt(
        nonce, msgpack.packb(content, use_bin_type=True), b"qpq/3 body|" + header)
    keys: dict[str, dict[str, bytes]] = {}
    for r in recipients:
        ik = split_identity(r.identity)[0]
        spk, opk = r.signed_prekey, r.one_time_key or b""
        ephemeral = X25519PrivateKey.generate()
        epk = public_bytes(ephemeral)
        secret = (_dh(sender_dh, spk) + _dh(ephemeral, ik) + _dh(ephemeral, spk)
                  + (_dh(ephemeral, opk) if opk else b""))
        wrap_nonce = os.urandom(12)
        wrapped = ChaCha20Poly1305(_wrap_key(secret, sender_identity, r.identity, spk, opk,
                                             epk)).encrypt(
            wrap_nonce, content_key, _wrap_aad(header, nonce, body, r.username))
        keys[r.username] = {"epk": epk, "ik": ik, "spk": spk, "opk": opk,
                            "n": wrap_nonce, "w": wrapped}
    return bytes(msgpack.packb({"v": _VERSION, "h": header, "n": nonce, "ct": body,
                                "k": keys}, use_bin_type=True))


def parse_envelope(envelope: bytes, me: str) -> Envelope:
    """Split out who claims to have sent it, for `me`; DecryptError when malformed."""
    try:
        data = msgpack.unpackb(envelope, raw=False)
        if not isinstance(data, dict) or data.get("v") != _VERSION:
            raise DecryptError("unsupported envelope version")
        header, nonce, body = data["h"], data["n"], data["ct"]
        entry = data["k"][me]
        version, sender, identity, sent_at_ms = msgpack.unpackb(header, raw=False)
        fields = [entry[f] for f in ("epk", "ik", "spk", "opk", "n", "w")]
    except (KeyError, TypeError, ValueError, msgpack.ExtraData) as exc:
        raise DecryptError(f"malformed envelope: {exc}") from None
    if not (version == _VERSION and isinstance(sender, str) and isinstance(identity, bytes)
            and len(identity) == IDENTITY_BYTES and isinstance(sent_at_ms, int)
            and all(isinstance(b, bytes) for b in (header, nonce, body, *fields))):
        raise DecryptError("malformed envelope: wrong field types")
    return Envelope(sender, identity, sent_at_ms, entry["epk"], header, nonce, body,
                    dict(zip(("epk", "ik", "spk", "opk", "n", "w"), fields, strict=True)))


def open_envelope(env: Envelope, me: str, my_identity: bytes,
                  private_key_for: Callable[[bytes], X25519PrivateKey | None],
                  sender_identity: bytes) -> tuple[bytes, dict[str, Any]]:
    """Open with the sender identity the caller verified; return (one-time key used or
    b"", content). ForgedSender / DecryptError when it is not authentic."""
    if env.sender_identity != sender_identity:
        raise ForgedSender(f"the envelope names an identity key that is not "
                           f"{env.sender!r}'s verified key")
    entry = env._entry
    epk, ik, spk, opk = entry["epk"], entry["ik"], entry["spk"], entry["opk"]
    identity = private_key_for(ik)
    signed = private_key_for(spk)
    one_time = private_key_for(opk) if opk else None
    if identity is None or signed is None or (opk and one_time is None):
        raise DecryptError("no private key for the keys this message was sent to")
    try:
        secret = (_dh(signed, split_identity(sender_identity)[0]) + _dh(identity, epk)
                  + _dh(signed, epk) + (_dh(one_time, epk) if one_time else b""))
        content_key = ChaCha20Poly1305(_wrap_key(secret, sender_identity, my_identity, spk,
                                                 opk, epk)).decrypt(
            entry["n"], entry["w"], _wrap_aad(env._header, env._nonce, env._body, me))
        content = msgpack.unpackb(ChaCha20Poly1305(content_key).decrypt(
            env._nonce, env._body, b"qpq/3 body|" + env._header), raw=False)
    except InvalidTag:
        raise ForgedSender(f"message failed authentication: not sealed with "
                           f"{env.sender!r}'s identity key, or tampered with") from None
    except ValueError as exc:
        raise DecryptError(f"malformed envelope: {exc}") from None
    if not isinstance(content, dict):
        raise DecryptError("malformed content")
    return opk, content
