"""A user's local profile: private keys, the replay cache and, per server, the session
and what was published there, in a 0600 file.

Layout: PROFILE_DIR/USER.keys (msgpack), PROFILE_DIR/USER.lock (the lock). Several
processes share a profile (a parked `recv --wait` while `login` runs in another
terminal), so every change is a read-modify-write of the file on disk under an
exclusive `flock` on the lock file (`Profile.edit`): a process never writes back keys
it loaded earlier. Written atomically so a crash never leaves a half-written key file.
The identity is an X25519 key (key agreement) plus an Ed25519 key (signing the prekey);
the signed prekey is rotated weekly and the previous ones are kept a while so messages
sealed to them still open.

One profile may hold accounts on several servers: sessions and published-key state are
kept per server (`servers`, keyed by the address as given to `--server`; the server's
key-transparency key, pinned per address in PROFILE_DIR/kt/, tells a re-initialised or
impostor server apart). The keys are the same on every server.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from qpq_server.client.e2e import public_bytes
from qpq_server.fsutil import write_atomic
from qpq_server.identity import signed_prekey_message

__all__ = ["Profile", "ServerState", "default_profile_dir", "locked", "server_file_name"]

_UNSAFE_IN_FILE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def server_file_name(server: str | None) -> str:
    """The name a server's files carry in the profile (KT state, contacts, devices,
    inbox): its address with anything a file name should not hold replaced."""
    return _UNSAFE_IN_FILE_NAME.sub("_", server or "default")

SIGNED_PREKEY_ROTATE_S = 7 * 86400
SIGNED_PREKEYS_KEPT = 4  # the current one and three predecessors (a month of mail)
REPLAY_WINDOW_S = 90 * 86400  # envelopes older than this are refused, newer are remembered


def default_profile_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "qpq-client"


def _raw_private(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created 0600): one writer at a time across
    processes. The kernel drops the lock if the process dies."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@dataclass
class ServerState:
    """What this profile has on one server."""

    session: str | None = None
    session_expires: float = 0.0
    published_identity: bool = False
    published_prekey: bytes = b""
    log_key: bytes = b""  # the server's key-transparency key when we last logged in

    def to_wire(self) -> dict[str, Any]:
        return {"session": self.session, "session_expires": self.session_expires,
                "published_identity": self.published_identity,
                "published_prekey": self.published_prekey, "log_key": self.log_key}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> ServerState:
        return cls(session=data.get("session"),
                   session_expires=float(data.get("session_expires") or 0.0),
                   published_identity=bool(data.get("published_identity", False)),
                   published_prekey=bytes(data.get("published_prekey") or b""),
                   log_key=bytes(data.get("log_key") or b""))


_LEGACY = ""  # profiles written before per-server state kept one unnamed server


@dataclass
class Profile:
    path: Path
    username: str
    identity: X25519PrivateKey
    signing: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    one_time: dict[bytes, X25519PrivateKey] = field(default_factory=dict)
    # public -> (private, created at); the newest is the one published
    signed_prekeys: dict[bytes, tuple[X25519PrivateKey, float]] = field(default_factory=dict)
    seen: dict[bytes, float] = field(default_factory=dict)  # replay id -> accepted at
    servers: dict[str, ServerState] = field(default_factory=dict)
    server: str = _LEGACY  # the server this copy was loaded for (not stored)

    @property
    def session(self) -> str | None:
        """The session on `server` (None when not logged in there)."""
        state = self.servers.get(self.server) or self.servers.get(_LEGACY)
        return state.session if state is not None else None

    @classmethod
    def load_or_create(cls, directory: Path, username: str, server: str = _LEGACY) -> Profile:
        path = directory / f"{username}.keys"
        if not path.exists():
            return cls(path=path, username=username, identity=X25519PrivateKey.generate(),
                       server=server)
        data = msgpack.unpackb(path.read_bytes(), raw=False)
        signing = data.get("signing")
        servers = {str(k): ServerState.from_wire(v)
                   for k, v in (data.get("servers") or {}).items()}
        if "servers" not in data and data.get("session") is not None:
            legacy = ServerState.from_wire(data)
            legacy.published_identity = bool(signing) and legacy.published_identity
            servers[_LEGACY] = legacy
        return cls(
            path=path, username=username,
            identity=X25519PrivateKey.from_private_bytes(data["identity"]),
            signing=(Ed25519PrivateKey.from_private_bytes(signing) if signing
                     else Ed25519PrivateKey.generate()),
            one_time={pub: X25519PrivateKey.from_private_bytes(priv)
                      for pub, priv in data.get("one_time", {}).items()},
            signed_prekeys={pub: (X25519PrivateKey.from_private_bytes(priv), float(at))
                            for pub, (priv, at) in data.get("signed_prekeys", {}).items()},
            seen={k: float(t) for k, t in data.get("seen", {}).items()},
            servers=servers, server=server,
        )

    @classmethod
    @contextmanager
    def edit(cls, directory: Path, username: str, server: str = _LEGACY) -> Iterator[Profile]:
        """Read-modify-write under the profile's lock: the profile as it is on disk now
        (not as some earlier load saw it), saved when the block ends without error."""
        with locked(directory / f"{username}.lock"):
            profile = cls.load_or_create(directory, username, server)
            yield profile
            profile.save()

    def knows(self, server: str) -> bool:
        """Has this profile been used with `server` before?"""
        return server in self.servers or _LEGACY in self.servers

    def state(self, server: str | None = None) -> ServerState:
        """The state on `server` (default: the one loaded for); a profile from before
        per-server state hands its one unnamed server to the first server it meets."""
        server = self.server if server is None else server
        if server not in self.servers:
            legacy = self.servers.pop(_LEGACY, None)
            self.servers[server] = legacy if legacy is not None else ServerState()
        return self.servers[server]

    @property
    def identity_public(self) -> bytes:
        """The 64-byte identity the key-transparency log records: X25519 || Ed25519."""
        signing = self.signing.public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw)
        return public_bytes(self.identity) + signing

    def sign(self, message: bytes) -> bytes:
        return self.signing.sign(message)

    def current_prekey(self, now: float) -> tuple[bytes, bytes]:
        """(signed prekey, its signature), rotating it when it is a week old."""
        newest = max(self.signed_prekeys.items(), key=lambda kv: kv[1][1], default=None)
        if newest is None or now - newest[1][1] >= SIGNED_PREKEY_ROTATE_S:
            key = X25519PrivateKey.generate()
            self.signed_prekeys[public_bytes(key)] = (key, now)
            for old in sorted(self.signed_prekeys, key=lambda p: self.signed_prekeys[p][1])[
                    :-SIGNED_PREKEYS_KEPT]:
                del self.signed_prekeys[old]
            newest = max(self.signed_prekeys.items(), key=lambda kv: kv[1][1])
        public = newest[0]
        return public, self.sign(signed_prekey_message(self.identity_public, public))

    def new_one_time_keys(self, count: int) -> list[bytes]:
        publics = []
        for _ in range(count):
            key = X25519PrivateKey.generate()
            pub = public_bytes(key)
            self.one_time[pub] = key
            publics.append(pub)
        return publics

    def private_key_for(self, public: bytes) -> X25519PrivateKey | None:
        if public == public_bytes(self.identity):
            return self.identity
        if public in self.signed_prekeys:
            return self.signed_prekeys[public][0]
        return self.one_time.get(public)

    def forget_one_time(self, public: bytes) -> None:
        """One-time keys are deleted after use: later compromise cannot read old mail."""
        self.one_time.pop(public, None)

    def remember(self, replay_id: bytes, now: float) -> None:
        self.seen[replay_id] = now
        for old in [k for k, at in self.seen.items() if now - at > REPLAY_WINDOW_S]:
            del self.seen[old]

    def save(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = msgpack.packb({
            "identity": _raw_private(self.identity),
            "signing": _raw_private(self.signing),
            "one_time": {pub: _raw_private(k) for pub, k in self.one_time.items()},
            "signed_prekeys": {pub: [_raw_private(k), at]
                               for pub, (k, at) in self.signed_prekeys.items()},
            "seen": self.seen,
            "servers": {name: state.to_wire() for name, state in self.servers.items()},
        }, use_bin_type=True)
        write_atomic(self.path, data, mode=0o600)
