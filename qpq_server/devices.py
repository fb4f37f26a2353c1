"""What server and client agree on about an account's devices (pure, no I/O).

An account is a set of devices, each with its own 64-byte identity (X25519 || Ed25519).
The key-transparency log records the whole set as the account's key: the sorted
concatenation of the identities. A single-device account's set is exactly its one
identity, so logs, pins and safety numbers written before devices existed stay valid.

A device id is a short hash of its identity: it names the device in `devices`,
`unlink`, its one-time key packages (8-byte tag) and its envelope wrap label.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from qpq_server.identity import IDENTITY_BYTES

__all__ = ["DEVICE_TAG_BYTES", "LINK_CODE_TTL_S", "MAX_DEVICES", "device_id", "device_tag",
           "endorsement_message", "join_device_set", "link_keys", "link_mac", "normalize_code",
           "split_device_set", "wrap_label"]

DEVICE_TAG_BYTES = 8
MAX_DEVICES = 8  # the default of [limits] max_devices
LINK_CODE_TTL_S = 600.0


def device_tag(identity: bytes) -> bytes:
    return hashlib.sha256(b"qpq-device/1\x00" + identity).digest()[:DEVICE_TAG_BYTES]


def device_id(identity: bytes) -> str:
    return device_tag(identity).hex()


def split_device_set(value: bytes) -> list[bytes]:
    """The identities in a logged device set; ValueError when it is not one."""
    if not value or len(value) % IDENTITY_BYTES:
        raise ValueError("a device set is one or more 64-byte identities")
    keys = [value[i:i + IDENTITY_BYTES] for i in range(0, len(value), IDENTITY_BYTES)]
    if keys != sorted(set(keys)):
        raise ValueError("a device set lists distinct identities in sorted order")
    return keys


def join_device_set(identities: Iterable[bytes]) -> bytes:
    return b"".join(sorted(set(identities)))


def wrap_label(username: str, identity: bytes) -> str:
    """Whom an envelope's wrap is for: the user and the device (bound into the wrap)."""
    return f"{username}/{device_id(identity)}"


def link_keys(code: str) -> tuple[bytes, bytes]:
    """(verifier, mac key) from a link code. The server learns only the verifier's hash
    (to gate the new device) and the verifier (when it is used): never the MAC key, so
    it cannot vouch for a device of its own making."""
    # scrypt: a short code must not be brute-forced offline from its verifier
    secret = Scrypt(salt=b"qpq-link/1", length=32, n=2**14, r=8, p=1).derive(
        normalize_code(code).encode())
    return (hmac.digest(secret, b"verifier", "sha256"), hmac.digest(secret, b"mac", "sha256"))


def normalize_code(code: str) -> str:
    """Codes are read aloud and typed: case, spaces and dashes do not matter."""
    return "".join(c for c in code.upper() if c.isalnum())


def link_mac(mac_key: bytes, username: str, identity: bytes) -> bytes:
    return hmac.digest(mac_key, b"qpq-link-mac/1\x00" + username.encode() + b"\x00"
                       + identity, "sha256")


def endorsement_message(username: str, endorser: bytes, new: bytes) -> bytes:
    """What an existing device signs (Ed25519) to vouch for a device it linked."""
    return b"qpq-device-endorse/1\x00" + username.encode() + b"\x00" + endorser + new
