"""The metrics and health HTTP listener: `/metrics`, `/healthz`, `/readyz`.

A small threaded WSGI server: scrapes never wait on the event loop, and a wedged loop
still answers `/healthz` (while `/readyz` reflects whether we are serving).
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

__all__ = ["HealthServer"]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """Keeps one spare file descriptor: when the process has run out (EMFILE), the
    spare is given up to accept the health check, and taken back once it is answered,
    so `/healthz` keeps answering while descriptors are exhausted."""

    daemon_threads = True
    # socketserver's default listen backlog is 5: more concurrent connects than that (two
    # Prometheus servers, load-balancer health checks, doctor) lose their SYNs, which the
    # client's kernel sends again only after a second.
    request_queue_size = 128
    _spare: int | None = None

    def server_activate(self) -> None:
        super().server_activate()
        self._take_spare()

    _spare_lock = threading.Lock()

    def _take_spare(self) -> None:
        with self._spare_lock:  # requests finish on their own threads
            if self._spare is None:
                try:
                    self._spare = os.open(os.devnull, os.O_RDONLY)
                except OSError:
                    self._spare = None  # still exhausted: again after the next request

    def get_request(self) -> tuple[Any, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            with self._spare_lock:
                if exc.errno not in (errno.EMFILE, errno.ENFILE) or self._spare is None:
                    raise
                os.close(self._spare)
                self._spare = None
            return super().get_request()

    def close_request(self, request: Any) -> None:
        super().close_request(request)
        self._take_spare()

    def server_close(self) -> None:
        super().server_close()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None


_POLL_INTERVAL_S = 0.05  # a select() timeout: 20 idle wake-ups a second cost nothing measurable


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class HealthServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 ready: Callable[[], bool]) -> None:
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/healthz":
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok\n"]
            if path == "/readyz":
                if ready():
                    start_response("200 OK", [("Content-Type", "text/plain")])
                    return [b"ready\n"]
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"not ready\n"]
            if path == "/metrics":
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: try /metrics, /healthz or /readyz\n"]

        self._server = make_server(host, port, app, server_class=_ThreadingWSGIServer,
                                   handler_class=_QuietHandler)
        # shutdown() waits for the serve loop's next poll: at socketserver's default
        # 0.5 s every stop (SIGTERM, each test's teardown) waited up to half a second.
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": _POLL_INTERVAL_S},
                                        name="qpq-metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
