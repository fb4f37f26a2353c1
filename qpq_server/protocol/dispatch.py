"""The dispatch core every transport shares: one request map in, one response map out.

Feature modules (messaging, key transparency, blobs, federation later) each expose their
operations as `ops() -> Mapping[str, Handler]`; the app registers them on one
`Dispatcher`. Transports (QUIC, WebSocket) own a `ConnectionState` per connection and
call `Dispatcher.handle`; whatever they answer themselves (a malformed frame, a streamed
blob transfer's failure) goes through `Dispatcher.error_response`, so every error has
the same shape and is counted once.

No sockets, no storage and no event loop here: the core is tested by calling `handle`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from qpq_server.errors import BadRequest, Internal, QpqError, RequestError

if TYPE_CHECKING:
    from qpq_server.auth.opaque import PendingLogin

__all__ = [
    "ConnectionState",
    "DispatchMetrics",
    "Dispatcher",
    "Gate",
    "Handler",
    "Request",
    "Response",
    "error_body",
]

log = logging.getLogger("qpq.dispatch")

Request = dict[str, Any]
"""A decoded, not yet validated request map (handlers validate each field they use)."""
Response = dict[str, Any]
Handler = Callable[[Request, "ConnectionState"], Awaitable[Response]]

_OP_LABEL_UNKNOWN = "unknown"
_OP_SHOWN_MAX = 64


@dataclass
class ConnectionState:
    """What the server knows about one client connection."""

    peer: str
    """The client's address as the transport sees it (the rate limiter's key)."""
    authenticated: bool = False
    """True once the connection presented a valid access token with `hello`."""
    token_id: str | None = None
    """Which access token it presented (a hash prefix), so revoking it can close us."""
    logged_in_as: set[str] = field(default_factory=set)
    """Users who completed an OPAQUE login on this connection."""
    pending_logins: dict[int, PendingLogin] = field(default_factory=dict)
    """Server-side OPAQUE login states awaiting `login_finish`, by login id."""
    fresh_logins: dict[str, float] = field(default_factory=dict)
    """When each user last proved their password on this connection (a password change
    needs such a proof moments before, not only a session)."""


class DispatchMetrics(Protocol):
    """What the dispatcher records per request."""

    def observe_rpc(self, op: str, seconds: float) -> None: ...

    def count_rpc_error(self, op: str, code: str) -> None: ...


class Gate(Protocol):
    """Checks that run before every handler (address rate limit, access token)."""

    def admit(self, op: str, conn: ConnectionState) -> None:
        """Raise a `RequestError` to refuse the request."""


def error_body(exc: RequestError) -> Response:
    """The wire shape of an error: a stable code and a human sentence."""
    return {"ok": False, "error": {"code": exc.code, "message": str(exc)}}


class Dispatcher:
    """Routes a request to the handler registered for its `op`."""

    def __init__(self, metrics: DispatchMetrics, gate: Gate,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        self._metrics = metrics
        self._gate = gate
        self._timer = timer
        self._handlers: dict[str, Handler] = {}

    @property
    def ops(self) -> frozenset[str]:
        return frozenset(self._handlers)

    def register(self, ops: Mapping[str, Handler]) -> None:
        """Add a feature's operations; two features may not claim one name."""
        taken = self._handlers.keys() & ops.keys()
        if taken:
            raise ValueError(f"operations registered twice: {', '.join(sorted(taken))}")
        self._handlers.update(ops)

    def op_label(self, op: object) -> str:
        """The metric label for an op: its name when registered, else one fixed label
        (so hostile op names cannot grow the label set)."""
        return op if isinstance(op, str) and op in self._handlers else _OP_LABEL_UNKNOWN

    def error_response(self, op: str, exc: RequestError) -> Response:
        """An error answer for `op`, counted in `qpq_rpc_errors_total{op,code}`."""
        self._metrics.count_rpc_error(op, exc.code)
        return error_body(exc)

    def observe(self, op: str, seconds: float) -> None:
        self._metrics.observe_rpc(op, seconds)

    async def handle(self, request: Request, conn: ConnectionState) -> Response:
        op = request.get("op")
        op_label = self.op_label(op)
        started = self._timer()
        try:
            if not isinstance(op, str):
                raise BadRequest("field 'op' must be a string")
            handler = self._handlers.get(op)
            if handler is None:
                raise BadRequest(f"unknown op {op[:_OP_SHOWN_MAX]!r}")
            self._gate.admit(op, conn)
            response = await handler(request, conn)
            response["ok"] = True
            return response
        except RequestError as exc:
            return self.error_response(op_label, exc)
        except QpqError as exc:
            log.error("request failed", extra={"op": op_label, "code": exc.code})
            return self.error_response(op_label, Internal("internal error"))
        except Exception:
            log.exception("unexpected error handling request", extra={"op": op_label})
            return self.error_response(op_label, Internal("internal error"))
        finally:
            self._metrics.observe_rpc(op_label, self._timer() - started)

