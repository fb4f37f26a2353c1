"""Secrets from the environment or the `.env` file beside the config.

Secret values are wrapped in `Secret`, whose repr never shows the value, so a secret
cannot leak into a log line or a traceback by accident.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qpq_server.errors import ConfigError
from qpq_server.fsutil import write_atomic

__all__ = ["Secret", "ServerSecrets", "load_secrets", "read_env_file", "write_env_file"]


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def write_env_file(path: Path, values: Mapping[str, str]) -> None:
    """Write atomically with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# qpq secrets: keep this file 0600 and out of backups of the data"]
    lines += [f"{key}={value}" for key, value in values.items()]
    write_atomic(path, "\n".join(lines) + "\n", mode=0o600)


@dataclass(frozen=True)
class ServerSecrets:
    auth_tokens: tuple[Secret, ...]  # current first, then the previous one during rotation
    db_key: Secret
    # The PostgreSQL DSN (`[storage] backend = "postgres"`); it may hold a password.
    database_url: Secret = field(default_factory=lambda: Secret(""))


def load_secrets(env_file: Path, environ: Mapping[str, str] | None = None) -> ServerSecrets:
    """Environment wins over the `.env` file; both tokens are accepted during rotation."""
    env = dict(os.environ if environ is None else environ)
    file_values = read_env_file(env_file)

    def get(name: str) -> str:
        return env.get(name) or file_values.get(name, "")

    token, previous, db_key = (get("QPQ_AUTH_TOKEN"), get("QPQ_AUTH_TOKEN_PREVIOUS"),
                               get("QPQ_DB_KEY"))
    if not token:
        raise ConfigError(f"QPQ_AUTH_TOKEN is not set (environment or {env_file})")
    if not db_key:
        raise ConfigError(f"QPQ_DB_KEY is not set (environment or {env_file})")
    tokens = (Secret(token),) + ((Secret(previous),) if previous else ())
    return ServerSecrets(auth_tokens=tokens, db_key=Secret(db_key),
                         database_url=Secret(get("QPQ_DATABASE_URL")))
