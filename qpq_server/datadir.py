"""The data dir layout and `qpq-server init`."""

from __future__ import annotations

import os
import secrets
import shutil
import tomllib
from pathlib import Path

import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from qpq_server.auth.opaque import create_setup
from qpq_server.config import (
    BlobsConfig,
    FederationConfig,
    LimitsConfig,
    MetricsConfig,
    QuicConfig,
    RateLimitConfig,
    RetentionConfig,
    ServerConfig,
    StorageConfig,
    WebSocketConfig,
)
from qpq_server.errors import ConfigError
from qpq_server.secrets import read_env_file, write_env_file
from qpq_server.tls import write_private_file, write_self_signed

__all__ = ["CONFIG_NAME", "init_data_dir", "join_data_dir", "session_key_path"]

CONFIG_NAME = "qpq-server.toml"


def session_key_path(data_dir: Path) -> Path:
    return data_dir / "keys" / "session.key"


def _defaults(section: object, *names: str) -> dict[str, object]:
    """The config dataclass's own defaults, so init never writes a stale copy of them."""
    return {name: getattr(section, name) for name in names}


def default_config(domain: str) -> dict[str, dict[str, object]]:
    """The keys an operator is most likely to tune, at their defaults."""
    return {
        "server": {**_defaults(ServerConfig(), "listen"), "domain": domain, "data_dir": ".",
                   **_defaults(ServerConfig(), "tls_cert", "tls_key", "workers")},
        "quic": _defaults(QuicConfig(), "idle_timeout_s", "max_concurrent_bidi_streams",
                          "max_connections", "max_frame_bytes", "handshake_timeout_s",
                          "max_handshakes_in_flight", "retry", "hello_timeout_s"),
        "limits": _defaults(LimitsConfig(), "max_response_bytes", "mailbox_max_bytes",
                            "max_recipients"),
        "storage": _defaults(StorageConfig(), "backend", "pool_size"),
        "metrics": _defaults(MetricsConfig(), "listen"),
        "rate_limit": _defaults(RateLimitConfig(), "account_rate_per_s", "account_burst",
                                "address_rate_per_s", "address_burst"),
        "blobs": _defaults(BlobsConfig(), "max_blob_bytes", "quota_bytes_per_account"),
        "retention": _defaults(RetentionConfig(), "days"),
        "federation": _defaults(FederationConfig(), "enabled"),
        "websocket": _defaults(WebSocketConfig(), "enabled", "listen"),
    }


def init_data_dir(data_dir: Path, domain: str = "localhost") -> list[Path]:
    """Create config, TLS, secrets, OPAQUE setup and server keys. Never overwrites."""
    env_path = data_dir / ".env"
    config_path = data_dir / CONFIG_NAME
    existing = [p for p in (env_path, config_path, data_dir / "opaque", data_dir / "tls")
                if p.exists()]
    if existing:
        raise ConfigError(
            f"{data_dir} is already initialised ({existing[0].name} exists); "
            "refusing to overwrite secrets"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    write_self_signed(data_dir / "tls" / "cert.pem", data_dir / "tls" / "key.pem", domain)
    (data_dir / "opaque").mkdir(mode=0o700)
    create_setup(data_dir / "opaque", version=1)
    write_private_file(session_key_path(data_dir), secrets.token_bytes(32))
    signing_key = ed25519.Ed25519PrivateKey.generate()
    write_private_file(
        data_dir / "kt" / "signing_key.pem",
        signing_key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
    )
    (data_dir / "blobs").mkdir(mode=0o700, exist_ok=True)
    write_env_file(env_path, {
        "QPQ_AUTH_TOKEN": secrets.token_urlsafe(32),
        "QPQ_DB_KEY": secrets.token_hex(32),
    })
    write_private_file(config_path, tomli_w.dumps(default_config(domain)).encode(), 0o640)
    return [config_path, data_dir / "tls" / "cert.pem", env_path]


def join_data_dir(data_dir: Path, existing: Path) -> list[Path]:
    """A new node of the cluster `existing` belongs to: its own TLS certificate, the
    cluster's secrets (access tokens, database key and URL, OPAQUE setup, session key, KT
    signing key) and config copied. Only nodes sharing one PostgreSQL make a cluster."""
    from qpq_server.config import load_config

    source_path = existing / CONFIG_NAME
    if not source_path.is_file():
        raise ConfigError(f"--join {existing}: no {CONFIG_NAME} there (not a qpq data dir)")
    source = load_config(source_path)
    if source.storage.backend != "postgres":
        raise ConfigError(f'--join {existing}: its [storage] backend is '
                          f'"{source.storage.backend}"; the nodes of a cluster share one '
                          f'database, so join only a node with backend = "postgres"')
    written = init_data_dir(data_dir, source.server.domain)
    for src, dst in ((source.data_dir / "opaque", data_dir / "opaque"),
                     (session_key_path(source.data_dir).parent, session_key_path(data_dir).parent),
                     (source.kt_signing_key_path.parent, data_dir / "kt")):
        shutil.rmtree(dst)
        shutil.copytree(src, dst)  # keeps the 0600/0700 modes
    write_env_file(data_dir / ".env", read_env_file(existing / ".env"))
    raw = tomllib.loads(source_path.read_text())
    own = default_config(source.server.domain)["server"]
    # The node's own paths: its data dir and its own certificate; everything else as the
    # cluster runs it.
    raw["server"] = {**raw.get("server", {}), "data_dir": ".",
                     "tls_cert": own["tls_cert"], "tls_key": own["tls_key"]}
    write_private_file(data_dir / CONFIG_NAME, tomli_w.dumps(raw).encode(), 0o640)
    return written
