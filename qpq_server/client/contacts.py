"""Pinned contact identities (like SSH's known_hosts) and safety numbers.

Pins live in PROFILE_DIR/contacts/<server>.json, `{user: identity hex}`. The first
verified key of a contact is pinned (trust on first use); a different key later is an
`IdentityChanged` until the user compares safety numbers and runs `qpq-client trust`.

Safety number (as Signal's numeric fingerprint, version 0): per party,
`h = SHA-512(0x0000 || identity || username)`, then 5200 times `h = SHA-512(h ||
identity)`; the first 30 bytes, as six 5-byte big-endian integers mod 100000, give 30
digits. The two parties' 30 digits, the smaller first, make the 60-digit number, so
both sides print the same one.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives import hashes

from qpq_server.client.errors import ClientError, IdentityChanged
from qpq_server.client.profile import locked, server_file_name
from qpq_server.fsutil import write_atomic

__all__ = ["ContactPins", "fingerprint_digits", "safety_number"]

_ITERATIONS = 5200


def _sha512(*parts: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA512())
    for part in parts:
        digest.update(part)
    return digest.finalize()


def fingerprint_digits(username: str, identity: bytes) -> str:
    """One party's 30 digits."""
    h = _sha512(b"\x00\x00", identity, username.encode())
    for _ in range(_ITERATIONS):
        h = _sha512(h, identity)
    return "".join(f"{int.from_bytes(h[i:i + 5], 'big') % 100000:05d}"
                   for i in range(0, 30, 5))


def safety_number(user_a: str, identity_a: bytes, user_b: str, identity_b: bytes) -> str:
    """60 digits in groups of five, the same whichever side computes it."""
    halves = sorted([fingerprint_digits(user_a, identity_a),
                     fingerprint_digits(user_b, identity_b)])
    digits = "".join(halves)
    return " ".join(digits[i:i + 5] for i in range(0, 60, 5))


class ContactPins:
    def __init__(self, profile_dir: Path, server: str) -> None:
        self.path = profile_dir / "contacts" / f"{server_file_name(server)}.json"

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ClientError("pins_unreadable",
                              f"cannot read pinned contacts {self.path}: {exc}") from None
        if not isinstance(data, dict):
            raise ClientError("pins_unreadable", f"{self.path}: not a JSON object")
        return {str(k): str(v) for k, v in data.items()}

    def get(self, username: str) -> bytes | None:
        value = self._load().get(username)
        return bytes.fromhex(value) if value else None

    def pin(self, username: str, identity: bytes) -> None:
        # read-modify-write under a lock: two processes pinning two contacts keep both
        with locked(self.path.with_name(self.path.name + ".lock")):
            data = self._load()
            data[username] = identity.hex()
            write_atomic(self.path, json.dumps(data, indent=1, sort_keys=True), mode=0o600)

    def check(self, username: str, identity: bytes) -> bool:
        """Pin on first sight; raise IdentityChanged when it differs from the pin.
        Returns True when this call pinned it."""
        pinned = self.get(username)
        if pinned is None:
            self.pin(username, identity)
            return True
        if pinned != identity:
            raise IdentityChanged(
                "identity_changed",
                f"{username}'s identity key changed since you pinned it in {self.path} "
                f"(pinned {pinned.hex()[:16]}..., now {identity.hex()[:16]}...). Compare "
                f"`qpq-client fingerprint {username}` with them out of band, then accept "
                f"the new key with `qpq-client trust {username}`")
        return False
