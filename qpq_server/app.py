"""`qpq-server run`: wire config, secrets, storage, auth, metrics and transports together,
then serve until SIGTERM (drain) with SIGHUP reloading tokens and the TLS certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from qpq_server.auth.access import AccessTokens
from qpq_server.auth.opaque import OpaqueServer
from qpq_server.auth.sessions import SessionSigner
from qpq_server.blobs.store import BlobStore
from qpq_server.blobs.transfer import BlobTransfers, blob_ops
from qpq_server.config import Config, load_config, parse_hostport
from qpq_server.datadir import session_key_path
from qpq_server.errors import ConfigError, StorageError
from qpq_server.fsutil import write_atomic
from qpq_server.http import HealthServer
from qpq_server.kt.log import KtLog, kt_ops, load_signer
from qpq_server.metrics import ServerMetrics
from qpq_server.notifier import InProcessNotifier
from qpq_server.protocol.dispatch import Dispatcher
from qpq_server.secrets import load_secrets
from qpq_server.service import Service
from qpq_server.storage import open_storage
from qpq_server.tls import certificate_not_after
from qpq_server.transport.quic import QuicListener
from qpq_server.transport.websocket import WebSocketListener

__all__ = ["RESTORE_STATE_KEY", "ServerApp", "run_server"]

log = logging.getLogger("qpq.server")

RESTORE_STATE_KEY = "restore_state"
"""Meta key set by `qpq-ops restore`; the server refuses to start until it reads 'done'."""


class ServerApp:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config: Config = load_config(config_path)
        self.env_file = config_path.parent / ".env"
        self.secrets = load_secrets(self.env_file)
        self.metrics = ServerMetrics()
        self.storage = open_storage(self.config, self.secrets.db_key,
                                    on_commit=self.metrics.db_write_duration_seconds.observe)
        self.ready = False
        self.websocket: WebSocketListener | None = None
        self._stop = asyncio.Event()

    def _session_signer(self) -> SessionSigner:
        path = session_key_path(self.config.data_dir)
        try:
            key = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read session key {path}: {exc.strerror}") from None
        return SessionSigner(key, self.config.server.session_ttl_s)

    async def run(self) -> None:
        await self.storage.open()
        try:
            await self._serve()
        finally:
            await self.storage.close()

    async def _serve(self) -> None:
        cfg = self.config
        restore_state = await self.storage.get_meta(RESTORE_STATE_KEY)
        if restore_state not in (None, "done"):
            raise StorageError(
                f"this data dir was restored and its restore is not finished "
                f"(state {restore_state!r}); run the restore's key-package purge first"
            )
        kt = KtLog(self.storage, load_signer(cfg.kt_signing_key_path),
                   on_size=self.metrics.kt_log_size.set)
        await kt.load()
        blobs = BlobStore(cfg.blobs_dir, max_blob_bytes=cfg.blobs.max_blob_bytes,
                          quota_bytes_per_account=cfg.blobs.quota_bytes_per_account,
                          retention_s=cfg.retention.days * 86400,
                          on_bytes=self.metrics.blob_bytes.set)
        await blobs.open()
        self.service = Service(
            config=cfg, storage=self.storage,
            opaque=OpaqueServer(cfg.data_dir / "opaque"), signer=self._session_signer(),
            access=AccessTokens(self.secrets.auth_tokens), metrics=self.metrics,
            notifier=InProcessNotifier(), kt=kt, blobs=blobs,
        )
        self.dispatcher = Dispatcher(self.metrics, self.service)
        for ops in (self.service.ops(), kt_ops(kt, self.storage), blob_ops()):
            self.dispatcher.register(ops)
        await self.service.start()
        self.metrics.tls_cert_expiry_timestamp_seconds.set(
            certificate_not_after(cfg.tls_cert_path))
        self.listener = QuicListener(
            cfg, self.dispatcher, self.metrics, self.service.connection_closed,
            BlobTransfers(self.service, self.dispatcher, blobs, cfg.quic.max_frame_bytes,
                          cfg.blobs.chunk_bytes, cfg.blobs.upload_idle_timeout_s))
        host, port = parse_hostport(cfg.server.listen)
        try:
            await self.listener.start(host, port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on UDP {cfg.server.listen}: {exc.strerror}") from None
        if cfg.websocket.enabled:
            self.websocket = WebSocketListener(cfg, self.dispatcher,
                                               self.service.connection_closed)
            whost, wport = parse_hostport(cfg.websocket.listen)
            try:
                await self.websocket.start(whost, wport)
            except OSError as exc:
                self.listener.close()
                raise ConfigError(f"cannot listen on TCP {cfg.websocket.listen} for the "
                                  f"WebSocket bridge: {exc.strerror}") from None
        mhost, mport = parse_hostport(cfg.metrics.listen)
        try:
            health = HealthServer(mhost, mport, self.metrics.registry, lambda: self.ready)
        except OSError as exc:
            self.listener.close()
            if self.websocket is not None:
                await self.websocket.close()
            raise ConfigError(
                f"cannot listen on TCP {cfg.metrics.listen} for metrics: {exc.strerror}"
            ) from None
        health.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        sweeper = loop.create_task(self._sweep_blobs(blobs))
        self._write_pid()
        self.ready = True
        log.info("serving", extra={"listen": cfg.server.listen, "quic_port": self.listener.port,
                                   "metrics": cfg.metrics.listen, "domain": cfg.server.domain})
        try:
            await self._stop.wait()
            await self._drain()
        finally:
            self.ready = False
            sweeper.cancel()
            if self.websocket is not None:
                await self.websocket.close()
            health.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            with contextlib.suppress(OSError):
                cfg.pid_path.unlink()

    async def _sweep_blobs(self, blobs: BlobStore) -> None:
        """Delete expired, unreferenced blobs at start and every sweep interval."""
        while True:
            try:
                expired = await blobs.sweep()
                if expired:
                    log.info("expired blobs deleted", extra={"count": len(expired)})
            except OSError as exc:
                log.error("blob sweep failed", extra={"error": str(exc)})
            await asyncio.sleep(self.config.retention.sweep_interval_s)

    def _in_flight(self) -> int:
        ws = self.websocket.in_flight_requests if self.websocket is not None else 0
        return self.listener.in_flight_requests + ws

    def _write_pid(self) -> None:
        write_atomic(self.config.pid_path, f"{os.getpid()}\n", mode=0o644, sync_dir=False)

    def reload(self) -> None:
        """SIGHUP: re-read access tokens and the TLS certificate; connections stay up."""
        try:
            secrets = load_secrets(self.env_file)
            self.service.access.replace(secrets.auth_tokens)
            self.listener.reload_certificate()
            self.metrics.tls_cert_expiry_timestamp_seconds.set(
                certificate_not_after(self.config.tls_cert_path))
        except (ConfigError, OSError, ValueError) as exc:
            log.error("reload failed; keeping the previous tokens and certificate",
                      extra={"error": str(exc)})
            return
        log.info("reloaded access tokens and TLS certificate",
                 extra={"tokens": len(secrets.auth_tokens)})

    async def _drain(self) -> None:
        """Stop taking work, answer parked fetches, let in-flight requests commit."""
        log.info("draining")
        self.ready = False
        self.listener.stop_accepting()
        self.service.draining = True
        # Once draining is set no fetch parks again, so one wake-up answers them all.
        self.service.notifier.wake_all()
        deadline = time.monotonic() + self.config.server.shutdown_grace_s
        while self._in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self.listener.close()
        await asyncio.sleep(0.05)  # let CONNECTION_CLOSE datagrams leave
        log.info("stopped")


def run_server(config_path: Path) -> None:
    app = ServerApp(config_path)
    asyncio.run(app.run())
