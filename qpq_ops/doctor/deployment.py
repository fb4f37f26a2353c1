"""The few facts doctor needs from `qpq-server.toml`, resolved like the server does.

Relative paths are relative to the config file's directory; the pid file is relative
to the data dir. Only what doctor reads is parsed: `qpq-server check-config` is the
validator.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Deployment", "DeploymentError", "load_deployment"]


class DeploymentError(ValueError):
    """The config cannot be read; the message is one line."""


@dataclass(frozen=True)
class Deployment:
    config_path: Path
    data_dir: Path
    tls_cert: Path
    pid_file: Path
    metrics_listen: str

    @property
    def metrics_url(self) -> str:
        """Where to reach the metrics listener from this host."""
        host, _, port = self.metrics_listen.rpartition(":")
        host = host.strip("[]")
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    @property
    def metrics_port(self) -> int:
        return int(self.metrics_listen.rpartition(":")[2])


def _str(table: object, key: str, default: str, where: str) -> str:
    if not isinstance(table, dict):
        raise DeploymentError(f"[{where}] must be a table")
    value = table.get(key, default)
    if not isinstance(value, str):
        raise DeploymentError(f"[{where}] {key} must be a string")
    return value


def load_deployment(config_path: Path) -> Deployment:
    try:
        config = tomllib.loads(config_path.read_text())
    except OSError as exc:
        raise DeploymentError(f"cannot read {config_path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise DeploymentError(f"{config_path} is not valid TOML: {exc}") from None
    base = config_path.resolve().parent
    server, metrics = config.get("server", {}), config.get("metrics", {})

    def resolve(root: Path, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else root / path

    data_dir = resolve(base, _str(server, "data_dir", "data", "server"))
    listen = _str(metrics, "listen", "127.0.0.1:9090", "metrics")
    if not listen.rpartition(":")[2].isdigit():
        raise DeploymentError(f"[metrics] listen {listen!r} is not HOST:PORT")
    return Deployment(
        config_path=config_path,
        data_dir=data_dir,
        tls_cert=resolve(base, _str(server, "tls_cert", "tls/cert.pem", "server")),
        pid_file=resolve(data_dir, _str(server, "pid_file", "qpq-server.pid", "server")),
        metrics_listen=listen,
    )
