"""Server configuration: typed frozen dataclasses loaded from `qpq-server.toml`.

Relative paths are resolved against the config file's directory. `validate_config`
collects every problem (unknown keys, wrong types, out-of-range values, missing
referenced files) so `check-config` can report them all at once.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from qpq_server.errors import ConfigError
from qpq_server.secrets import read_env_file

__all__ = [
    "BlobsConfig",
    "Config",
    "FederationConfig",
    "FederationPeer",
    "MetricsConfig",
    "QuicConfig",
    "RateLimitConfig",
    "RetentionConfig",
    "ServerConfig",
    "StorageConfig",
    "WebSocketConfig",
    "load_config",
    "parse_hostport",
    "validate_config",
]


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "0.0.0.0:7000"
    domain: str = "localhost"
    data_dir: str = "data"
    tls_cert: str = "tls/cert.pem"
    tls_key: str = "tls/key.pem"
    pid_file: str = "qpq-server.pid"
    session_ttl_s: int = 86400
    log_level: str = "info"
    shutdown_grace_s: float = 10.0
    # Worker processes sharing the QUIC port (SO_REUSEPORT): N, or "auto" (usable cores).
    workers: int | str = 1

    @property
    def worker_count(self) -> int:
        if self.workers == "auto":
            return max(1, len(os.sched_getaffinity(0)))
        return int(self.workers)


@dataclass(frozen=True)
class QuicConfig:
    idle_timeout_s: float = 300.0
    max_concurrent_bidi_streams: int = 100
    max_connections: int = 10000
    max_frame_bytes: int = 1048576
    handshake_timeout_s: float = 10.0
    max_handshakes_in_flight: int = 256
    retry: str = "auto"
    # Before the access token a connection holds little: a few seconds, a few KiB, and a
    # slot in its own small budgets, so tokenless floods cannot fill max_connections.
    hello_timeout_s: float = 5.0
    max_preauth_bytes: int = 65536
    max_unauthenticated_connections: int = 1024
    max_unauthenticated_per_address: int = 32


@dataclass(frozen=True)
class StorageConfig:
    backend: str = "sqlcipher"
    pool_size: int = 4
    path: str = "qpq.db"
    wal_autocheckpoint: int = 2000
    busy_timeout_ms: int = 5000
    max_batch: int = 64
    file_dir: str = "store"  # the file backend's directory (relative to data_dir)
    # postgres: how long to wait for a pooled connection before a request fails cleanly
    connect_timeout_s: float = 5.0


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9090"


@dataclass(frozen=True)
class RateLimitConfig:
    enabled: bool = True
    account_rate_per_s: float = 20.0
    account_burst: int = 40
    address_rate_per_s: float = 50.0
    address_burst: int = 100
    # Failed logins per (account, address): this many pass, then each further one
    # doubles the wait (from login_backoff_base_s up to login_backoff_max_s).
    login_failures_burst: int = 5
    login_backoff_base_s: float = 1.0
    login_backoff_max_s: float = 900.0
    # get_keys for other users, per requester (refused with rate_limited beyond it)
    key_fetch_rate_per_s: float = 10.0
    key_fetch_burst: int = 200
    # one-time packages one requester may take of one user; beyond it the answer
    # carries only the signed prekey, so nobody can drain someone's packages
    one_time_key_rate_per_s: float = 1 / 60
    one_time_key_burst: int = 5


@dataclass(frozen=True)
class LimitsConfig:
    max_recipients: int = 100
    max_devices: int = 8  # devices per account (each gets a copy of every message)
    max_key_packages: int = 200
    max_fetch_batch: int = 500
    max_wait_s: float = 60.0
    # One fetch answer carries at most this many payload bytes; clients page for more.
    max_response_bytes: int = 8388608
    # Every copy of a message counts: fan-out cannot fill a mailbox or the disk for free.
    mailbox_max_bytes: int = 268435456
    enqueue_bytes_per_minute: int = 67108864


@dataclass(frozen=True)
class BlobsConfig:
    max_blob_bytes: int = 104857600  # 100 MiB of ciphertext per attachment
    quota_bytes_per_account: int = 1073741824  # 1 GiB held per uploader
    chunk_bytes: int = 262144  # download chunk frame size (capped by max_frame_bytes)
    upload_idle_timeout_s: float = 60.0  # a stalled upload is discarded after this
    upload_deadline_s: float = 3600.0  # however it trickles, an upload ends by then
    max_concurrent_uploads: int = 4  # per account


@dataclass(frozen=True)
class RetentionConfig:
    days: float = 30.0  # unreferenced blobs older than this are deleted
    sweep_interval_s: float = 3600.0


@dataclass(frozen=True)
class FederationPeer:
    domain: str = ""
    address: str = ""


@dataclass(frozen=True)
class FederationConfig:
    enabled: bool = False
    domain: str = ""
    listen: str = "0.0.0.0:7001"
    federation_cert: str = ""
    federation_key: str = ""
    federation_ca: str = ""
    peers: tuple[FederationPeer, ...] = ()
    relay_max_age_s: float = 604800.0  # an undelivered relay expires after a week
    retry_base_s: float = 1.0  # first retry delay; doubles per failure (with jitter)
    retry_max_s: float = 300.0
    # Relay ids delivered are remembered this long (longer than any peer retries).
    remember_relays_s: float = 2592000.0
    peer_rate_per_s: float = 200.0  # relays and key lookups per peer
    peer_burst: int = 2000
    outbox_max_bytes: int = 1073741824  # per peer: beyond it local senders are refused
    poll_interval_s: float = 5.0  # outbox re-read (other workers or nodes queue too)
    probe_interval_s: float = 30.0  # an idle peer is pinged this often (peer_up)
    # QUIC handshake and each lookup through a peer (a client waits for key lookups)
    connect_timeout_s: float = 5.0


@dataclass(frozen=True)
class WebSocketConfig:
    enabled: bool = False
    listen: str = "127.0.0.1:7080"
    trust_x_forwarded_for: bool = False  # behind our own proxy: rate-limit the real client
    max_in_flight: int = 16  # requests per socket; beyond it the bridge stops reading


@dataclass(frozen=True)
class Config:
    base_dir: Path
    server: ServerConfig = field(default_factory=ServerConfig)
    quic: QuicConfig = field(default_factory=QuicConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    blobs: BlobsConfig = field(default_factory=BlobsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    websocket: WebSocketConfig = field(default_factory=WebSocketConfig)

    def path(self, value: str) -> Path:
        """Resolve a config path relative to the config file's directory."""
        p = Path(value)
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def data_dir(self) -> Path:
        return self.path(self.server.data_dir)

    def data_path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else (self.data_dir / p)

    @property
    def tls_cert_path(self) -> Path:
        return self.path(self.server.tls_cert)

    @property
    def tls_key_path(self) -> Path:
        return self.path(self.server.tls_key)

    @property
    def db_path(self) -> Path:
        return self.data_path(self.storage.path)

    @property
    def blobs_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def file_store_dir(self) -> Path:
        return self.data_path(self.storage.file_dir)

    @property
    def kt_signing_key_path(self) -> Path:
        return self.data_dir / "kt" / "signing_key.pem"

    @property
    def pid_path(self) -> Path:
        return self.data_path(self.server.pid_file)


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "quic": QuicConfig,
    "storage": StorageConfig,
    "metrics": MetricsConfig,
    "rate_limit": RateLimitConfig,
    "limits": LimitsConfig,
    "blobs": BlobsConfig,
    "retention": RetentionConfig,
    "federation": FederationConfig,
    "websocket": WebSocketConfig,
}

_ENUMS = {
    ("quic", "retry"): {"auto", "always", "never"},
    ("storage", "backend"): {"sqlcipher", "file", "postgres"},
    ("server", "log_level"): {"debug", "info", "warning", "error"},
}
_POSITIVE = {
    ("quic", "idle_timeout_s"),
    ("quic", "max_concurrent_bidi_streams"),
    ("quic", "max_connections"),
    ("quic", "handshake_timeout_s"),
    ("quic", "max_handshakes_in_flight"),
    ("quic", "hello_timeout_s"),
    ("quic", "max_preauth_bytes"),
    ("quic", "max_unauthenticated_connections"),
    ("quic", "max_unauthenticated_per_address"),
    ("storage", "pool_size"),
    ("storage", "max_batch"),
    ("storage", "connect_timeout_s"),
    ("server", "session_ttl_s"),
    ("blobs", "max_blob_bytes"),
    ("blobs", "quota_bytes_per_account"),
    ("blobs", "chunk_bytes"),
    ("blobs", "upload_idle_timeout_s"),
    ("retention", "days"),
    ("retention", "sweep_interval_s"),
    ("limits", "max_response_bytes"),
    ("limits", "mailbox_max_bytes"),
    ("limits", "enqueue_bytes_per_minute"),
    ("blobs", "upload_deadline_s"),
    ("websocket", "max_in_flight"),
    ("blobs", "max_concurrent_uploads"),
    ("rate_limit", "account_rate_per_s"),
    ("rate_limit", "account_burst"),
    ("rate_limit", "address_rate_per_s"),
    ("rate_limit", "address_burst"),
    ("rate_limit", "login_failures_burst"),
    ("rate_limit", "login_backoff_base_s"),
    ("rate_limit", "login_backoff_max_s"),
    ("rate_limit", "key_fetch_rate_per_s"),
    ("rate_limit", "key_fetch_burst"),
    ("rate_limit", "one_time_key_rate_per_s"),
    ("rate_limit", "one_time_key_burst"),
    ("federation", "relay_max_age_s"),
    ("federation", "retry_base_s"),
    ("federation", "retry_max_s"),
    ("federation", "remember_relays_s"),
    ("federation", "peer_rate_per_s"),
    ("federation", "peer_burst"),
    ("federation", "outbox_max_bytes"),
    ("federation", "poll_interval_s"),
    ("federation", "probe_interval_s"),
    ("federation", "connect_timeout_s"),
}
_HOSTPORTS = {("server", "listen"), ("metrics", "listen"), ("federation", "listen"),
              ("websocket", "listen")}


def _workers_ok(value: Any) -> bool:
    return value == "auto" or (isinstance(value, int) and not isinstance(value, bool)
                               and 1 <= value <= 256)


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def _build_section(name: str, raw: Any, problems: list[str]) -> Any:
    cls = _SECTIONS[name]
    if not isinstance(raw, dict):
        problems.append(f"[{name}] must be a table")
        return cls()
    defaults = cls()
    known = {f.name for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if name == "federation" and key == "peers":
            values["peers"] = _build_peers(value, problems)
            continue
        if key not in known:
            problems.append(f"[{name}] unknown key {key!r}")
            continue
        default = getattr(defaults, key)
        if (name, key) == ("server", "workers"):
            if not _workers_ok(value):
                problems.append(f'[server] workers must be an integer 1..256 or "auto", '
                                f"got {value!r}")
            else:
                values[key] = value
            continue
        if not _type_ok(value, default):
            problems.append(
                f"[{name}] {key} must be {type(default).__name__}, got {type(value).__name__}"
            )
            continue
        if isinstance(default, float):
            value = float(value)
        allowed = _ENUMS.get((name, key))
        if allowed and value not in allowed:
            problems.append(f"[{name}] {key} must be one of {sorted(allowed)}, got {value!r}")
            continue
        if (name, key) in _POSITIVE and value <= 0:
            problems.append(f"[{name}] {key} must be > 0, got {value}")
            continue
        if (name, key) in _HOSTPORTS:
            try:
                parse_hostport(value)
            except ValueError as exc:
                problems.append(f"[{name}] {key}: {exc}")
                continue
        values[key] = value
    return cls(**values)


def _build_peers(raw: Any, problems: list[str]) -> tuple[FederationPeer, ...]:
    if not isinstance(raw, list):
        problems.append("[[federation.peers]] must be an array of tables")
        return ()
    peers = []
    for item in raw:
        if not isinstance(item, dict) or set(item) - {"domain", "address"}:
            problems.append("[[federation.peers]] entries take only domain and address")
            continue
        peers.append(FederationPeer(str(item.get("domain", "")), str(item.get("address", ""))))
    return tuple(peers)


def _parse(path: Path) -> tuple[Config, list[str]]:
    problems: list[str] = []
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except PermissionError:
        raise ConfigError(f"config file not readable: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            problems.append(f"unknown section [{name}]")
            continue
        sections[name] = _build_section(name, value, problems)
    config = Config(base_dir=path.resolve().parent, **sections)
    q = config.quic
    if q.max_frame_bytes < 1024 or q.max_frame_bytes > 64 * 1024 * 1024:
        problems.append("[quic] max_frame_bytes must be between 1024 and 67108864")
    if q.idle_timeout_s > 3600:
        problems.append("[quic] idle_timeout_s must be at most 3600")
    if config.server.workers != 1 and config.storage.backend == "file":
        problems.append('[server] workers > 1 needs [storage] backend = "sqlcipher" (or '
                        '"postgres"): the file backend keeps its counters in one process')
    problems += _federation_problems(config)
    limits = config.limits
    if not q.max_frame_bytes + 65536 <= limits.max_response_bytes <= 64 * 1024 * 1024:
        problems.append("[limits] max_response_bytes must be at least max_frame_bytes + 65536 "
                        "(one largest message fits) and at most 67108864")
    if q.max_concurrent_bidi_streams > 10000:
        problems.append("[quic] max_concurrent_bidi_streams must be at most 10000")
    return config, problems


def _federation_problems(config: Config) -> list[str]:
    """The section's own consistency (its files are checked with the others)."""
    from qpq_server.federation.address import DOMAIN_RE

    fed = config.federation
    if not fed.enabled:
        return []
    problems = []
    own = (fed.domain or config.server.domain).lower()
    if not DOMAIN_RE.match(own):
        problems.append(f"[federation] domain {own!r} is not a domain name")
    seen: set[str] = set()
    for peer in fed.peers:
        domain = peer.domain.lower()
        if not DOMAIN_RE.match(domain):
            problems.append(f"[[federation.peers]] domain {peer.domain!r} is not a domain name")
        elif domain == own:
            problems.append(f"[[federation.peers]] {domain!r} is this server's own domain")
        elif domain in seen:
            problems.append(f"[[federation.peers]] {domain!r} is listed twice")
        seen.add(domain)
        if peer.address:
            try:
                parse_hostport(peer.address)
            except ValueError as exc:
                problems.append(f"[[federation.peers]] {domain!r} address: {exc}")
    if fed.retry_base_s > fed.retry_max_s:
        problems.append("[federation] retry_base_s must be at most retry_max_s")
    if fed.remember_relays_s <= fed.relay_max_age_s:
        problems.append("[federation] remember_relays_s must be longer than relay_max_age_s "
                        "(else a late retry could be delivered twice)")
    return problems


def _file_problems(config: Config) -> list[str]:
    problems = []
    for label, p in (("tls_cert", config.tls_cert_path), ("tls_key", config.tls_key_path)):
        if not p.is_file():
            problems.append(f"[server] {label}: file not found: {p}")
    if not config.data_dir.is_dir():
        problems.append(f"[server] data_dir: directory not found: {config.data_dir}")
    fed = config.federation
    if fed.enabled:
        for label, value in (("federation_cert", fed.federation_cert),
                             ("federation_key", fed.federation_key),
                             ("federation_ca", fed.federation_ca)):
            if not value or not config.path(value).is_file():
                problems.append(f"[federation] {label}: file not found: "
                                f"{config.path(value) if value else '(unset)'}")
    return problems


def _database_url_problems(config: Config, path: Path) -> list[str]:
    """postgres needs QPQ_DATABASE_URL (environment or the .env beside the config), and it
    must parse as a libpq DSN. The value is never echoed: it may hold a password."""
    if config.storage.backend != "postgres":
        return []
    env_file = path.parent / ".env"
    dsn = os.environ.get("QPQ_DATABASE_URL") or read_env_file(env_file).get(
        "QPQ_DATABASE_URL", "")
    if not dsn:
        return [f'[storage] backend = "postgres" needs QPQ_DATABASE_URL (environment or '
                f'{env_file}), e.g. postgresql://qpq:PASSWORD@db.example:5432/qpq'
                f'?sslmode=verify-full']
    import psycopg  # only postgres deployments load the driver
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(dsn)
    except psycopg.Error:
        return ["QPQ_DATABASE_URL is not a valid PostgreSQL connection string "
                "(postgresql://USER:PASSWORD@HOST:PORT/DBNAME or key=value pairs)"]
    return []


def validate_config(path: Path) -> list[str]:
    """Every problem with the config file at `path` (empty list when valid)."""
    try:
        config, problems = _parse(path)
    except ConfigError as exc:
        return [str(exc)]
    return problems + _file_problems(config) + _database_url_problems(config, path)


def load_config(path: Path) -> Config:
    """Load and validate; raise ConfigError naming the first problems."""
    config, problems = _parse(path)
    problems += _file_problems(config)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return config
