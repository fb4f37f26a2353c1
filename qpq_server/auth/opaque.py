"""Our small adapter over `opaque_ke_py` (OPAQUE, RFC 9807): the server never sees a password.

Server setups are versioned files `opaque/setup-vN.bin` so a rotation can add a new
setup while accounts registered under an older one still log in. Each setup has a
dummy password file made once, used for unknown usernames so that they cannot be told
apart from wrong passwords.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import opaque_ke_py as opaque

from qpq_server.errors import ConfigError, LoginFailed
from qpq_server.tls import write_private_file

__all__ = ["OpaqueServer", "PendingLogin", "create_setup"]

_SETUP_FILE = re.compile(r"^setup-v(\d+)\.bin\Z")
_DUMMY_USER = b"\x00qpq-dummy"


def create_setup(directory: Path, version: int) -> None:
    """Write a new server setup and its dummy record (init and rotation use this)."""
    setup = opaque.server_setup()
    reg = opaque.client_registration_start(os.urandom(32))
    response = opaque.server_registration_start(setup, reg.get_message(), _DUMMY_USER)
    finish = opaque.client_registration_finish(
        os.urandom(32), reg.get_state(), response.get_message()
    )
    record = opaque.server_registration_finish(finish.get_message()).get_password_file()
    write_private_file(directory / f"setup-v{version}.bin", setup.to_bytes())
    write_private_file(directory / f"dummy-v{version}.bin", record)


@dataclass(frozen=True)
class PendingLogin:
    """Server state between login start and finish (kept on the connection, used once)."""

    username: str
    state: bytes
    known_user: bool
    setup_version: int


class OpaqueServer:
    def __init__(self, directory: Path) -> None:
        self._setups: dict[int, opaque.ServerSetupData] = {}
        self._dummies: dict[int, bytes] = {}
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            raise ConfigError(f"cannot read OPAQUE setup dir {directory}: {exc}") from None
        for name in names:
            match = _SETUP_FILE.match(name)
            if not match:
                continue
            version = int(match.group(1))
            try:
                self._setups[version] = opaque.ServerSetupData.from_bytes(
                    (directory / name).read_bytes()
                )
                self._dummies[version] = (directory / f"dummy-v{version}.bin").read_bytes()
            except (OSError, ValueError) as exc:
                raise ConfigError(f"OPAQUE setup v{version} unreadable: {exc}") from None
        if not self._setups:
            raise ConfigError(f"no OPAQUE server setup in {directory} (run qpq-server init)")
        self.current_version = max(self._setups)

    def registration_start(self, username: str, request: bytes) -> bytes:
        setup = self._setups[self.current_version]
        try:
            response = opaque.server_registration_start(setup, request, username.encode())
            return response.get_message()
        except ValueError as exc:
            raise LoginFailed("registration request is malformed") from exc

    @staticmethod
    def registration_finish(upload: bytes) -> bytes:
        try:
            return opaque.server_registration_finish(upload).get_password_file()
        except ValueError as exc:
            raise LoginFailed("registration upload is malformed") from exc

    def login_start(self, username: str, request: bytes, password_file: bytes | None,
                    setup_version: int | None) -> tuple[bytes, PendingLogin]:
        known = password_file is not None and setup_version in self._setups
        version = setup_version if known and setup_version is not None else self.current_version
        record = password_file if known and password_file is not None else self._dummies[version]
        try:
            result = opaque.server_login_start(
                self._setups[version], record, request, username.encode()
            )
        except ValueError as exc:
            raise LoginFailed("login request is malformed") from exc
        pending = PendingLogin(username, result.get_state(), known, version)
        return result.get_message(), pending

    @staticmethod
    def login_finish(pending: PendingLogin, finalization: bytes) -> None:
        try:
            opaque.server_login_finish(pending.state, finalization)
        except ValueError:
            raise LoginFailed("login failed") from None
        if not pending.known_user:
            # Cannot normally happen (the client cannot finish against a dummy record),
            # but never let a dummy record log anybody in.
            raise LoginFailed("login failed")
