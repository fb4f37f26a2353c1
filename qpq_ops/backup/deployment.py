"""One deployment as `qpq-ops` sees it: the server config, its data dir and its secrets."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from qpq_ops.backup.errors import Refused
from qpq_server.config import Config, load_config
from qpq_server.errors import ConfigError
from qpq_server.secrets import Secret, read_env_file

__all__ = ["Deployment", "load_deployment"]


@dataclass(frozen=True)
class Deployment:
    config_path: Path
    config: Config

    @property
    def env_file(self) -> Path:
        """The `.env` beside the config, where `qpq-server run` reads secrets from."""
        return self.config_path.parent / ".env"

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    @property
    def db_path(self) -> Path:
        return self.config.db_path

    def env_value(self, name: str, environ: Mapping[str, str] | None = None) -> str:
        """Like the server: the environment wins over the `.env` file."""
        env = os.environ if environ is None else environ
        return env.get(name) or read_env_file(self.env_file).get(name, "")

    def db_key(self, environ: Mapping[str, str] | None = None) -> Secret | None:
        value = self.env_value("QPQ_DB_KEY", environ)
        return Secret(value) if value else None


def load_deployment(config_path: Path) -> Deployment:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise Refused(str(exc)) from None
    return Deployment(config_path.resolve(), config)
