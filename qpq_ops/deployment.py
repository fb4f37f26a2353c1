"""One deployment as `qpq-ops` sees it: the server config, its data dir and its secrets.

Loaded once, by the server's own `load_config`, for every command (doctor, backup,
restore, rotate), so paths resolve exactly as `qpq-server run` resolves them.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from qpq_ops.errors import ConfigInvalid, ConfigUnreadable
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

    @property
    def tls_cert(self) -> Path:
        return self.config.tls_cert_path

    @property
    def pid_file(self) -> Path:
        return self.config.pid_path

    @property
    def metrics_listen(self) -> str:
        return self.config.metrics.listen

    @property
    def metrics_port(self) -> int:
        return int(self.metrics_listen.rpartition(":")[2])

    @property
    def metrics_url(self) -> str:
        """Where to reach the metrics listener from this host."""
        host = self.metrics_listen.rpartition(":")[0].strip("[]")
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{f'[{host}]' if ':' in host else host}:{self.metrics_port}"

    def env_value(self, name: str, environ: Mapping[str, str] | None = None) -> str:
        """Like the server: the environment wins over the `.env` file."""
        env = os.environ if environ is None else environ
        return env.get(name) or read_env_file(self.env_file).get(name, "")

    def db_key(self, environ: Mapping[str, str] | None = None) -> Secret | None:
        value = self.env_value("QPQ_DB_KEY", environ)
        return Secret(value) if value else None


def load_deployment(config_path: Path) -> Deployment:
    """The deployment `config_path` describes, or a one-line error.

    Raises `ConfigUnreadable` when the file cannot be read or is not TOML, and
    `ConfigInvalid` when it is TOML the server would refuse (doctor reports the second
    as a finding instead of stopping).
    """
    try:
        config = load_config(config_path)
    except OSError as exc:  # one load_config does not translate (a directory, say)
        raise ConfigUnreadable(f"cannot read {config_path}: {exc.strerror or exc}") from None
    except ConfigError as exc:
        # load_config raises `from None` while handling the OSError or TOML error that
        # made the file unusable; `__context__` still holds it (PEP 415).
        cause = exc.__context__
        if isinstance(cause, OSError):
            raise ConfigUnreadable(
                f"cannot read {config_path}: {cause.strerror or cause}") from None
        if isinstance(cause, tomllib.TOMLDecodeError):
            raise ConfigUnreadable(f"{config_path} is not valid TOML: {cause}") from None
        raise ConfigInvalid(str(exc)) from None
    return Deployment(config_path.resolve(), config)
