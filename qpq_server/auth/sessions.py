"""Session tokens any worker process can verify: HMAC-SHA256 over (user, expiry, issue
time, nonce[, device]).

A token may be bound to one of the account's devices (version 3, the device id last):
that device's requests then act for it alone, and unlinking it ends its sessions only.

No server-side session table is needed, so several processes on one host (or several
hosts sharing the key) accept each other's sessions. Revocation (logout, a password
change) is a per-account "not before" mark compared with the issue time
(`qpq_server.auth.revocation`).
"""

from __future__ import annotations

import base64
import hmac
import os
from dataclasses import dataclass

import msgpack
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac

from qpq_server.errors import InvalidSession

__all__ = ["Session", "SessionSigner"]

_VERSION = 2  # 2 adds the issue time; version-1 tokens are refused (log in again)
_DEVICE_VERSION = 3  # 2 plus the device the session is bound to


@dataclass(frozen=True)
class Session:
    username: str
    expires_at: float
    issued_at: float
    device: str = ""  # the device it is bound to ("" for an account-wide session)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    def __init__(self, key: bytes, ttl_s: float) -> None:
        if len(key) < 32:
            raise ValueError("session key must be at least 32 bytes")
        self._key = key
        self._ttl = ttl_s

    def __repr__(self) -> str:
        return f"SessionSigner(ttl_s={self._ttl})"

    def _mac(self, body: bytes) -> bytes:
        h = crypto_hmac.HMAC(self._key, hashes.SHA256())
        h.update(body)
        return h.finalize()

    def issue(self, username: str, now: float, device: str = "") -> tuple[str, float]:
        expires = now + self._ttl
        fields: list[object] = [_VERSION, username, expires, now, os.urandom(12)]
        if device:
            fields = [_DEVICE_VERSION, *fields[1:], device]
        body = msgpack.packb(fields, use_bin_type=True)
        return f"{_b64(body)}.{_b64(self._mac(body))}", expires

    def verify(self, token: str, now: float) -> Session:
        try:
            body_text, mac_text = token.split(".", 1)
            body, mac = _unb64(body_text), _unb64(mac_text)
        except (ValueError, TypeError):
            raise InvalidSession("session token is malformed") from None
        if not hmac.compare_digest(mac, self._mac(body)):
            raise InvalidSession("session token signature does not verify")
        try:
            fields = msgpack.unpackb(body, raw=False)
        except (ValueError, TypeError, msgpack.ExtraData):
            raise InvalidSession("session token is malformed") from None
        if not isinstance(fields, list) or (fields[:1], len(fields)) not in (
                ([_VERSION], 5), ([_DEVICE_VERSION], 6)):
            raise InvalidSession("session token version is not supported; log in again")
        _version, username, expires, issued, _nonce, *bound = fields
        device = bound[0] if bound else ""
        if not isinstance(device, str):
            raise InvalidSession("session token is malformed")
        if not isinstance(username, str) or not isinstance(expires, float | int) \
                or not isinstance(issued, float | int):
            raise InvalidSession("session token is malformed")
        if float(expires) <= now:
            raise InvalidSession("session expired; log in again")
        return Session(username=username, expires_at=float(expires), issued_at=float(issued),
                       device=device)
