"""A user's local profile: private keys and the current session, in a 0600 file.

Layout: PROFILE_DIR/USER.keys (msgpack). Written atomically so a crash never leaves a
half-written key file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from qpq_server.client.e2e import public_bytes
from qpq_server.fsutil import write_atomic

__all__ = ["Profile", "default_profile_dir"]


def default_profile_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "qpq-client"


def _raw_private(key: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


@dataclass
class Profile:
    path: Path
    username: str
    identity: X25519PrivateKey
    one_time: dict[bytes, X25519PrivateKey] = field(default_factory=dict)
    session: str | None = None
    session_expires: float = 0.0
    published_identity: bool = False

    @classmethod
    def load_or_create(cls, directory: Path, username: str) -> Profile:
        path = directory / f"{username}.keys"
        if path.exists():
            data = msgpack.unpackb(path.read_bytes(), raw=False)
            return cls(
                path=path, username=username,
                identity=X25519PrivateKey.from_private_bytes(data["identity"]),
                one_time={pub: X25519PrivateKey.from_private_bytes(priv)
                          for pub, priv in data.get("one_time", {}).items()},
                session=data.get("session"), session_expires=data.get("session_expires", 0.0),
                published_identity=data.get("published_identity", False),
            )
        return cls(path=path, username=username, identity=X25519PrivateKey.generate())

    @property
    def identity_public(self) -> bytes:
        return public_bytes(self.identity)

    def new_one_time_keys(self, count: int) -> list[bytes]:
        publics = []
        for _ in range(count):
            key = X25519PrivateKey.generate()
            pub = public_bytes(key)
            self.one_time[pub] = key
            publics.append(pub)
        return publics

    def private_key_for(self, public: bytes) -> X25519PrivateKey | None:
        if public == self.identity_public:
            return self.identity
        return self.one_time.get(public)

    def forget_one_time(self, public: bytes) -> None:
        """One-time keys are deleted after use: later compromise cannot read old mail."""
        self.one_time.pop(public, None)

    def save(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = msgpack.packb({
            "identity": _raw_private(self.identity),
            "one_time": {pub: _raw_private(k) for pub, k in self.one_time.items()},
            "session": self.session, "session_expires": self.session_expires,
            "published_identity": self.published_identity,
        }, use_bin_type=True)
        write_atomic(self.path, data, mode=0o600)
