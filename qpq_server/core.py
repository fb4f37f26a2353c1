"""The server's request-handling core, built from config, secrets and open storage.

`build_core` wires the messaging service, the key-transparency log and the blob store
onto one `Dispatcher`; `qpq-server run` puts transports in front of it, and the
in-process tests call `core.dispatcher.handle` directly, without sockets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qpq_server.auth.access import AccessTokens
from qpq_server.auth.opaque import OpaqueServer
from qpq_server.auth.sessions import SessionSigner
from qpq_server.blobs.store import BlobStore
from qpq_server.blobs.transfer import blob_ops
from qpq_server.config import Config
from qpq_server.datadir import session_key_path
from qpq_server.errors import ConfigError, StorageError
from qpq_server.kt.log import KtLog, kt_ops, load_signer
from qpq_server.metrics import ServerMetrics
from qpq_server.notifier import DeliveryNotifier, InProcessNotifier
from qpq_server.protocol.dispatch import Dispatcher
from qpq_server.secrets import ServerSecrets
from qpq_server.service import Service
from qpq_server.storage.base import RESTORE_JOURNAL, RESTORE_STATE_KEY, Storage

if TYPE_CHECKING:
    from qpq_server.federation.hub import Federation

__all__ = ["ServerCore", "build_core", "load_session_signer", "refuse_interrupted_restore"]


@dataclass(frozen=True)
class ServerCore:
    service: Service
    dispatcher: Dispatcher
    kt: KtLog
    blobs: BlobStore
    federation: Federation | None = None


def load_session_signer(config: Config) -> SessionSigner:
    path = session_key_path(config.data_dir)
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read session key {path}: {exc.strerror}") from None
    return SessionSigner(key, config.server.session_ttl_s)


def refuse_interrupted_restore(data_dir: Path) -> None:
    """Before storage opens: a restore killed while renaming files may have left the old
    database without its WAL; opening it then would lose the rows the WAL holds."""
    if (data_dir / RESTORE_JOURNAL).exists():
        raise StorageError(
            f"a restore into {data_dir} was interrupted while placing files "
            f"({RESTORE_JOURNAL} is there); run `qpq-ops restore --resume` (it rolls the "
            "interrupted restore back: the old data goes back in place) or rerun the restore"
        )


async def _refuse_unfinished_restore(storage: Storage) -> None:
    restore_state = await storage.get_meta(RESTORE_STATE_KEY)
    if restore_state not in (None, "done"):
        raise StorageError(
            f"this data dir was restored and its restore is not finished "
            f"(state {restore_state!r}); run the restore's key-package purge first"
        )


async def build_core(config: Config, secrets: ServerSecrets, storage: Storage,
                     metrics: ServerMetrics, notifier: DeliveryNotifier | None = None,
                     clock: Callable[[], float] = time.time,
                     worker: int | None = None, shared_storage: bool = False) -> ServerCore:
    """Everything behind the transports, on storage that is already open. `worker` is
    this process's index when several workers share the data dir; `shared_storage` says
    other processes write the same storage (workers, or nodes on one PostgreSQL)."""
    await _refuse_unfinished_restore(storage)
    kt = KtLog(storage, load_signer(config.kt_signing_key_path), on_size=metrics.kt_log_size.set,
               clock=clock, shared=shared_storage)
    await kt.load()
    blobs = BlobStore(config.blobs_dir, max_blob_bytes=config.blobs.max_blob_bytes,
                      quota_bytes_per_account=config.blobs.quota_bytes_per_account,
                      retention_s=config.retention.days * 86400,
                      on_bytes=metrics.blob_bytes.set,
                      max_concurrent_uploads=config.blobs.max_concurrent_uploads,
                      on_refused=lambda kind: metrics.quota_refused_total.labels(kind=kind).inc(),
                      worker=worker)
    await blobs.open()
    service = Service(
        config=config, storage=storage, opaque=OpaqueServer(config.data_dir / "opaque"),
        signer=load_session_signer(config), access=AccessTokens(secrets.auth_tokens),
        metrics=metrics, notifier=notifier or InProcessNotifier(), kt=kt, blobs=blobs,
        clock=clock,
    )
    dispatcher = Dispatcher(metrics, service)
    log_ops = kt_ops(kt, storage)
    federation = None
    if config.federation.enabled:  # USER@DOMAIN routing; app.py starts its listener
        from qpq_server.federation.hub import Federation

        federation = Federation(config, storage, metrics, clock)
        service.federation = federation
        log_ops = federation.wrap_kt_ops(log_ops)
    for ops in (service.ops(), log_ops, blob_ops()):
        dispatcher.register(ops)
    await service.start()
    return ServerCore(service=service, dispatcher=dispatcher, kt=kt, blobs=blobs,
                      federation=federation)
