"""Pick the storage backend named by `[storage] backend`.

Backends are imported by name, only when chosen: importing the service (or this module)
loads no database driver, so a deployment on one backend never needs the others'.
"""

from __future__ import annotations

from qpq_server.config import Config
from qpq_server.errors import ConfigError
from qpq_server.secrets import Secret
from qpq_server.storage.base import CommitObserver, Storage

__all__ = ["open_storage"]


def open_storage(config: Config, db_key: Secret,
                 on_commit: CommitObserver | None = None,
                 database_url: Secret | None = None) -> Storage:
    backend = config.storage.backend
    if backend == "sqlcipher":
        from qpq_server.storage.sqlcipher import SqlCipherStorage

        s = config.storage
        return SqlCipherStorage(
            config.db_path, db_key, pool_size=s.pool_size, max_batch=s.max_batch,
            busy_timeout_ms=s.busy_timeout_ms, wal_autocheckpoint=s.wal_autocheckpoint,
            on_commit=on_commit,
        )
    if backend == "file":
        from qpq_server.storage.filestore import FileStorage

        return FileStorage(config.file_store_dir, pool_size=config.storage.pool_size,
                           on_commit=on_commit)
    if backend == "postgres":
        if not database_url:
            raise ConfigError('[storage] backend = "postgres" needs QPQ_DATABASE_URL '
                              '(environment or the .env beside the config)')
        from qpq_server.storage.postgres import PostgresStorage

        return PostgresStorage(database_url, pool_size=config.storage.pool_size,
                               connect_timeout_s=config.storage.connect_timeout_s,
                               on_commit=on_commit)
    raise ConfigError(f"[storage] backend {backend!r} is not available in this build")
