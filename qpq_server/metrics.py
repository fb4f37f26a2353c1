"""Every metric of DESIGN.md the server exports, on a registry passed in (no globals).

With several worker processes (PROMETHEUS_MULTIPROC_DIR set by the supervisor) values
live in per-process files the supervisor merges on `/metrics`: counters and histograms
are summed; each gauge says how (`livesum` for what each worker holds, such as
connections — each worker's share of the connection cap adds up to the configured cap;
`mostrecent` for host-wide facts every worker reads from storage; `max`/`min` for facts
all workers share).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

__all__ = ["ServerMetrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
_HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.enqueue_total = Counter(
            "qpq_enqueue_total", "Messages accepted into delivery queues", registry=r)
        self.fetch_total = Counter("qpq_fetch_total", "Fetch calls served", registry=r)
        self.delivery_queue_depth = Gauge(
            "qpq_delivery_queue_depth", "Messages waiting for delivery, all queues", registry=r,
            multiprocess_mode="mostrecent")
        self.delivery_waiters = Gauge(
            "qpq_delivery_waiters", "Parked long-poll fetches", registry=r,
            multiprocess_mode="livesum")
        self.rate_limit_hit_total = Counter(
            "qpq_rate_limit_hit_total", "Requests refused by the rate limiter", ["scope"],
            registry=r)
        self.auth_login_failure_total = Counter(
            "qpq_auth_login_failure_total",
            "Failed logins (bad password, unknown user, bad access token)", registry=r)
        self.auth_login_success_total = Counter(
            "qpq_auth_login_success_total", "Successful logins", registry=r)
        self.connections_active = Gauge(
            "qpq_connections_active", "Open QUIC connections", registry=r,
            multiprocess_mode="livesum")
        self.connections_max = Gauge(
            "qpq_connections_max", "Configured connection cap", registry=r,
            multiprocess_mode="livesum")
        self.connections_refused_total = Counter(
            "qpq_connections_refused_total", "Connections refused (cap, handshake flood, draining)",
            ["reason"], registry=r)
        self.sessions_active = Gauge(
            "qpq_sessions_active", "Live sessions (logged-in connections)", registry=r,
            multiprocess_mode="livesum")
        self.tls_handshake_duration_seconds = Histogram(
            "qpq_tls_handshake_duration_seconds", "QUIC/TLS handshake time",
            buckets=_HANDSHAKE_BUCKETS, registry=r)
        self.rpc_duration_seconds = Histogram(
            "qpq_rpc_duration_seconds", "Request handling time per operation", ["op"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.rpc_errors_total = Counter(
            "qpq_rpc_errors_total", "Requests answered with an error", ["op", "code"], registry=r)
        self.db_write_duration_seconds = Histogram(
            "qpq_db_write_duration_seconds", "Storage commit latency",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.blob_bytes = Gauge("qpq_blob_bytes", "Bytes held in blob storage", registry=r,
                                multiprocess_mode="mostrecent")
        self.kt_log_size = Gauge(
            "qpq_kt_log_size", "Leaves in the key-transparency log", registry=r,
            multiprocess_mode="max")
        self.key_packages_low_total = Counter(
            "qpq_key_packages_low_total",
            "Key fetches that left the user with few one-time key packages (or none, "
            "so senders fell back to the signed prekey)", registry=r)
        self.federation_relay_total = Counter(
            "qpq_federation_relay_total", "Messages relayed to/from federation peers",
            ["peer", "result"], registry=r)
        # Per peer series appear once [federation] is enabled (one per configured peer).
        self.federation_queue_depth = Gauge(
            "qpq_federation_queue_depth", "Relays waiting in the outbound queue per peer",
            ["peer"], registry=r, multiprocess_mode="mostrecent")
        self.federation_peer_up = Gauge(
            "qpq_federation_peer_up", "1 when the last relay attempt to the peer succeeded",
            ["peer"], registry=r, multiprocess_mode="max")
        self.federation_refused_total = Counter(
            "qpq_federation_refused_total",
            "Federation connections refused at authentication, by reason (unknown_peer, "
            "other_ca, expired, wrong_domain, wrong_address, bad_signature, bad_certificate)",
            ["reason"], registry=r)
        self.tls_cert_expiry_timestamp_seconds = Gauge(
            "qpq_tls_cert_expiry_timestamp_seconds", "notAfter of the serving TLS certificate",
            registry=r, multiprocess_mode="min")
        self.quota_refused_total = Counter(
            "qpq_quota_refused_total", "Requests refused by a quota", ["kind"], registry=r)
        self.reload_total = Counter(
            "qpq_reload_total",
            "SIGHUP reloads of access tokens and the TLS certificate, by result",
            ["result"], registry=r)
        # Touch label-less series so every name is present from the first scrape.
        self.rate_limit_hit_total.labels(scope="account")
        self.rate_limit_hit_total.labels(scope="address")
        for kind in ("mailbox_bytes", "recipients", "enqueue_bytes", "uploads"):
            self.quota_refused_total.labels(kind=kind)
        for result in ("ok", "failed"):
            self.reload_total.labels(result=result)

    # -- what the dispatch core records (protocol.dispatch.DispatchMetrics) ------------
    def observe_rpc(self, op: str, seconds: float) -> None:
        self.rpc_duration_seconds.labels(op=op).observe(seconds)

    def count_rpc_error(self, op: str, code: str) -> None:
        self.rpc_errors_total.labels(op=op, code=code).inc()
