"""`qpq-server run`: wire config, secrets, storage, the core and transports together,
then serve until SIGTERM (drain) with SIGHUP reloading tokens and the TLS certificate.

Start-up is a list of steps on one `AsyncExitStack`: each step that acquires something
registers its own release, so a failure at any step undoes exactly what came before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from qpq_server import eventloop
from qpq_server.blobs.store import BlobStore
from qpq_server.blobs.transfer import BlobTransfers
from qpq_server.config import Config, load_config, parse_hostport
from qpq_server.core import (
    ServerCore,
    build_core,
    load_session_signer,
    refuse_interrupted_restore,
)
from qpq_server.errors import ConfigError, QpqError, StorageError
from qpq_server.fsutil import write_atomic
from qpq_server.http import HealthServer
from qpq_server.liveness import LoopHeartbeat
from qpq_server.metrics import ServerMetrics
from qpq_server.notifier import DeliveryNotifier, InProcessNotifier
from qpq_server.protocol.dispatch import ConnectionState
from qpq_server.secrets import load_secrets
from qpq_server.storage import open_storage
from qpq_server.storage.base import RESTORE_STATE_KEY, HealthProbe
from qpq_server.tls import certificate_not_after
from qpq_server.transport.quic import QuicListener
from qpq_server.transport.websocket import WebSocketListener
from qpq_server.worker_notifier import WorkerNotifier
from qpq_server.workers import WorkerContext, per_worker_share, worker_group

if TYPE_CHECKING:
    from qpq_server.pgnotify import PgNotifier

__all__ = ["RESTORE_STATE_KEY", "ServerApp", "run_server"]

log = logging.getLogger("qpq.server")

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PROBE_INTERVAL_S = 1.0
_PROBE_TIMEOUT_S = 10.0  # the postgres ping is bounded by its own ~2 s timeouts


class ServerApp:
    def __init__(self, config_path: Path, worker: WorkerContext | None = None) -> None:
        self.config_path = config_path
        self.worker = worker
        # A worker runs on its share of the host's budgets (connections, token buckets).
        self.config: Config = per_worker_share(load_config(config_path),
                                               worker.count if worker else 1)
        self.env_file = config_path.parent / ".env"
        self.secrets = load_secrets(self.env_file)
        self.metrics = ServerMetrics()
        self.storage = open_storage(self.config, self.secrets.db_key,
                                    on_commit=self.metrics.db_write_duration_seconds.observe,
                                    database_url=self.secrets.database_url)
        self.ready = False
        self.storage_ok = True  # turned off by the storage probe while the database is away
        self.pg_notifier: PgNotifier | None = None
        self.heartbeat = LoopHeartbeat()
        self.websocket: WebSocketListener | None = None
        self._stop = asyncio.Event()

    def is_ready(self) -> bool:
        """Serving, the event loop alive, storage answering and (postgres) the wake-up
        connections up (asked from the HTTP thread)."""
        return self.ready and self.heartbeat.alive() and self._dependencies_ok()

    def _dependencies_ok(self) -> bool:
        """Storage answers and (postgres) the wake-up connections are up."""
        notifier = self.pg_notifier
        return self.storage_ok and (notifier is None or notifier.connected)

    async def run(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            refuse_interrupted_restore(self.config.data_dir)
            await self.storage.open()
            stack.push_async_callback(self.storage.close)
            notifier = await self._start_notifier(stack)
            self.core: ServerCore = await build_core(
                self.config, self.secrets, self.storage, self.metrics, notifier=notifier,
                worker=self.worker.index if self.worker and self.worker.count > 1 else None,
                shared_storage=self._storage_shared)
            if isinstance(notifier, WorkerNotifier):
                notifier.start()
                stack.callback(notifier.close)
            self.service = self.core.service
            if self.worker is not None and self.worker.count > 1:
                self.service.worker = self.worker.index
            self.metrics.tls_cert_expiry_timestamp_seconds.set(
                certificate_not_after(self.config.tls_cert_path))
            await self._start_quic(stack)
            await self._start_federation(stack)
            await self._start_websocket(stack)
            if self.worker is None:  # workers: the supervisor serves /metrics and the pid
                self._start_health(stack)
            self._start_background(stack, self.core.blobs)
            self._install_signals(stack)
            if self.worker is None:
                self._write_pid(stack)
            self.ready = True
            if self.worker is not None:
                self._report_to_supervisor(stack, self.worker)
            log.info("serving", extra={"listen": self.config.server.listen,
                                       "quic_port": self.listener.port,
                                       "metrics": self.config.metrics.listen,
                                       "domain": self.config.server.domain})
            await self._stop.wait()
            await self._drain()

    def _notifier(self) -> DeliveryNotifier:
        if self.worker is None or self.worker.count <= 1:
            return InProcessNotifier()
        return WorkerNotifier(worker_group(self.config), self.worker.index, self.worker.count)

    # -- start-up steps, each registering its own release ------------------------------
    async def _start_notifier(self, stack: contextlib.AsyncExitStack) -> DeliveryNotifier:
        """PostgreSQL: wake-ups cross nodes (and workers) over LISTEN/NOTIFY."""
        if self.config.storage.backend != "postgres":
            return self._notifier()
        from qpq_server.pgnotify import PgNotifier, channel_for

        notifier = PgNotifier(self.secrets.database_url, channel_for(self.config.server.domain),
                              connect_timeout_s=self.config.storage.connect_timeout_s)
        await notifier.start()
        stack.push_async_callback(notifier.close)
        self.pg_notifier = notifier
        return notifier

    async def _start_quic(self, stack: contextlib.AsyncExitStack) -> None:
        cfg, core = self.config, self.core
        self.listener = QuicListener(
            cfg, core.dispatcher, self.metrics, core.service.connection_closed,
            BlobTransfers(core.service, core.dispatcher, core.blobs, cfg.quic.max_frame_bytes,
                          cfg.blobs.chunk_bytes, cfg.blobs.upload_idle_timeout_s,
                          cfg.blobs.upload_deadline_s))
        host, port = parse_hostport(cfg.server.listen)
        try:
            await self.listener.start(host, port, reuse_port=self.worker is not None)
        except OSError as exc:
            raise ConfigError(f"cannot listen on UDP {cfg.server.listen}: {exc.strerror}") from None
        stack.callback(self.listener.close)

    async def _start_federation(self, stack: contextlib.AsyncExitStack) -> None:
        """The peers' listener on every worker (one UDP port); relaying on one process
        only, so two never send one outbox at once."""
        federation = self.core.federation
        if federation is None:
            return
        from qpq_server.kt.log import kt_ops

        worker = self.worker
        await federation.start(self.core.service, kt_ops(self.core.kt, self.storage),
                               self.core.service.relays_removed,
                               relay=worker is None or worker.index == 0,
                               reuse_port=worker is not None)
        stack.callback(federation.close)

    async def _start_websocket(self, stack: contextlib.AsyncExitStack) -> None:
        cfg = self.config
        if not cfg.websocket.enabled:
            return
        websocket = WebSocketListener(cfg, self.core.dispatcher,
                                      self.core.service.connection_closed)
        host, port = parse_hostport(cfg.websocket.listen)
        try:
            await websocket.start(host, port)
        except OSError as exc:
            raise ConfigError(f"cannot listen on TCP {cfg.websocket.listen} for the "
                              f"WebSocket bridge: {exc.strerror}") from None
        self.websocket = websocket
        stack.push_async_callback(websocket.close)

    def _start_health(self, stack: contextlib.AsyncExitStack) -> None:
        host, port = parse_hostport(self.config.metrics.listen)
        try:
            health = HealthServer(host, port, self.metrics.registry, self.is_ready)
        except OSError as exc:
            raise ConfigError(f"cannot listen on TCP {self.config.metrics.listen} for "
                              f"metrics: {exc.strerror}") from None
        health.start()
        stack.callback(health.stop)

    def _start_background(self, stack: contextlib.AsyncExitStack, blobs: BlobStore) -> None:
        loop = asyncio.get_running_loop()
        jobs = [self.heartbeat.run(), self._sweep_blobs(blobs), self._probe_storage()]
        if self._storage_shared:  # others change it: re-read what this process mirrors
            jobs += [self.core.service.revocations.run(), self._refresh_queue_depth()]
        for job in jobs:
            stack.callback(loop.create_task(job).cancel)

    @property
    def _storage_shared(self) -> bool:
        """Other processes write the same storage: sibling workers, or other nodes on
        one PostgreSQL database."""
        return (self.worker is not None and self.worker.count > 1) \
            or self.config.storage.backend == "postgres"

    def _report_to_supervisor(self, stack: contextlib.AsyncExitStack,
                              worker: WorkerContext) -> None:
        """'R' once serving, then a beat per second from the event loop: the supervisor's
        /readyz needs every worker's loop alive, not only its process."""
        fd = worker.pipe_fd

        async def beat() -> None:
            os.write(fd, b"R")
            while True:
                await asyncio.sleep(1.0)
                if not self._dependencies_ok():
                    continue  # no beat: the supervisor's /readyz fails while the DB is away
                try:
                    os.write(fd, b".")
                except BlockingIOError:
                    continue
                except OSError:  # the supervisor is gone: stop like on SIGTERM
                    self._stop.set()
                    return

        task = asyncio.get_running_loop().create_task(beat())
        stack.callback(task.cancel)

    def _install_signals(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in _SIGNALS:
            stack.callback(loop.remove_signal_handler, sig)

    def _write_pid(self, stack: contextlib.AsyncExitStack) -> None:
        pid_path = self.config.pid_path
        write_atomic(pid_path, f"{os.getpid()}\n", mode=0o600, sync_dir=False)

        def remove() -> None:
            self.ready = False
            with contextlib.suppress(OSError):
                pid_path.unlink()

        stack.callback(remove)

    # -- running -----------------------------------------------------------------------
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

    async def _refresh_queue_depth(self) -> None:
        """The depth is host-wide (other workers and nodes enqueue too): read it from
        storage now and then instead of trusting this process's own counting."""
        while True:
            await asyncio.sleep(5.0)
            with contextlib.suppress(QpqError, OSError):
                await self.core.service.refresh_queue_depth()

    async def _probe_storage(self) -> None:
        """Keep `storage_ok` current for /readyz, on backends that can be away (a
        database server); local files need no probe."""
        if not isinstance(self.storage, HealthProbe):
            return
        while True:
            try:
                async with asyncio.timeout(_PROBE_TIMEOUT_S):
                    await self.storage.ping()
                ok = True
            except (StorageError, TimeoutError) as exc:
                ok = False
                if self.storage_ok:
                    detail = getattr(exc, "detail", None) or str(exc) or "probe timed out"
                    log.error("storage unavailable; /readyz fails until it is back",
                              extra={"error": detail})
            if ok and not self.storage_ok:
                log.info("storage available again")
            self.storage_ok = ok
            await asyncio.sleep(_PROBE_INTERVAL_S)

    def _in_flight(self) -> int:
        ws = self.websocket.in_flight_requests if self.websocket is not None else 0
        return self.listener.in_flight_requests + ws

    def reload(self) -> None:
        """SIGHUP: re-read access tokens, the session key and the TLS certificate;
        connections on a token still accepted stay up."""
        try:
            secrets = load_secrets(self.env_file)
            signer = load_session_signer(self.config)
            self.listener.reload_certificate()
            if self.core.federation is not None:
                self.core.federation.reload()
            self.service.access.replace(secrets.auth_tokens)
            self.service.signer = signer
            self._close_revoked()
            self.metrics.tls_cert_expiry_timestamp_seconds.set(
                certificate_not_after(self.config.tls_cert_path))
        except (ConfigError, OSError, ValueError) as exc:
            self.metrics.reload_total.labels(result="failed").inc()
            log.error("reload failed; keeping the previous tokens and certificate",
                      extra={"error": str(exc)})
            return
        self.metrics.reload_total.labels(result="ok").inc()
        log.info("reloaded access tokens and TLS certificate",
                 extra={"tokens": len(secrets.auth_tokens)})

    def _close_revoked(self) -> None:
        """Connections that authenticated with a token no longer configured are closed:
        revoking a leaked token must also cut off whoever is already in with it."""
        access = self.service.access

        def revoked(state: ConnectionState) -> bool:
            return state.authenticated and not access.is_current(state.token_id)

        phrase = "the access token this connection used was revoked; reconnect"
        closed = self.listener.close_where(revoked, phrase)
        if self.websocket is not None:
            closed += self.websocket.close_where(revoked, phrase)
        if closed:
            log.warning("closed connections on a revoked access token",
                        extra={"connections": closed})

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
    eventloop.run(app.run())

