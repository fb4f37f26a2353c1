"""What a worker process is, and its share of the host's budgets.

With `[server] workers = N` the supervisor starts N workers on one `SO_REUSEPORT` port.
Per-process budgets (connection caps, handshakes in flight, token buckets) are divided
by N, so the host as a whole keeps the configured numbers: opening N connections, which
the kernel spreads over the workers, does not multiply a limit by N. (A client whose
connections all land on one worker gets that worker's share.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass

from qpq_server.config import Config

__all__ = ["WorkerContext", "per_worker_share", "worker_group"]


@dataclass(frozen=True)
class WorkerContext:
    index: int
    """0-based worker number (the `worker` label of per-worker metrics)."""
    count: int
    """How many workers share the port."""
    pipe_fd: int
    """Where the worker reports readiness and heartbeats to the supervisor."""


def worker_group(config: Config) -> str:
    """A name shared by the workers of one deployment (their notifier sockets)."""
    return hashlib.sha256(str(config.data_dir.resolve()).encode()).hexdigest()[:16]


def _share(total: float, count: int) -> float:
    return total / count


def _ishare(total: int, count: int) -> int:
    return max(1, math.ceil(total / count))


def per_worker_share(config: Config, count: int) -> Config:
    """The config one of `count` workers runs with: host-wide budgets divided."""
    if count <= 1:
        return config
    q, rl, limits = config.quic, config.rate_limit, config.limits
    return dataclasses.replace(
        config,
        quic=dataclasses.replace(
            q, max_connections=_ishare(q.max_connections, count),
            max_handshakes_in_flight=_ishare(q.max_handshakes_in_flight, count),
            max_unauthenticated_connections=_ishare(q.max_unauthenticated_connections, count),
            max_unauthenticated_per_address=_ishare(q.max_unauthenticated_per_address, count)),
        rate_limit=dataclasses.replace(
            rl, account_rate_per_s=_share(rl.account_rate_per_s, count),
            account_burst=_ishare(rl.account_burst, count),
            address_rate_per_s=_share(rl.address_rate_per_s, count),
            address_burst=_ishare(rl.address_burst, count),
            key_fetch_rate_per_s=_share(rl.key_fetch_rate_per_s, count),
            key_fetch_burst=_ishare(rl.key_fetch_burst, count),
            one_time_key_rate_per_s=_share(rl.one_time_key_rate_per_s, count),
            one_time_key_burst=_ishare(rl.one_time_key_burst, count)),
        limits=dataclasses.replace(
            limits, enqueue_bytes_per_minute=_ishare(limits.enqueue_bytes_per_minute, count)),
    )
