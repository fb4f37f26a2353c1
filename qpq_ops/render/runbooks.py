"""Runbook prose for `docs/operations/incident-response.md`, one entry per anchor.

Every scaling trigger and every health alert links here (`runbook_url`); a test fails
when an anchor has no runbook or a runbook no alert. Thresholds are not written here:
the generated document takes them from `qpq_ops.triggers`.
"""

from __future__ import annotations

from dataclasses import dataclass

from qpq_ops.render.units import duration_text
from qpq_ops.triggers import BACKUP_MAX_AGE_S, TLS_EXPIRY_CRITICAL_S, TLS_EXPIRY_WARNING_S

__all__ = ["RUNBOOKS", "Runbook", "runbook_for"]


@dataclass(frozen=True)
class Runbook:
    anchor: str
    """Trigger id or health-alert anchor; the section's `id` in the document."""
    title: str
    symptom: str
    checks: tuple[str, ...]
    commands: tuple[str, ...]
    fix: tuple[str, ...]


_PROM = "http://127.0.0.1:9091"

RUNBOOKS: tuple[Runbook, ...] = (
    Runbook(
        anchor="cpu",
        title="CPU usage",
        symptom="Handshakes and requests slow down together; TLS handshake p95 and RPC "
        "latency rise with CPU. One qpq server process uses at most one core (aioquic), "
        "so a 4-core host can be 'only' 25% busy while the server is saturated.",
        checks=(
            "Is it the qpq process? Compare `process_cpu_seconds_total` of the server "
            "with the host's CPU in the Host row.",
            "Is there a handshake storm (connections panel jumping, many new clients) or "
            "a brute-force attempt (login failures)?",
            "Is something else on the host busy (backup compression, another service)?",
        ),
        commands=(
            f"qpq-ops check-triggers --prometheus-url {_PROM}",
            "top -H -p \"$(cat /path/to/data/qpq-server.pid)\"",
            "curl -s http://127.0.0.1:9090/metrics | grep -E '^process_cpu_seconds_total'",
        ),
        fix=(
            "Short term: rate-limit abusive sources (see login_failures, rate_limit_hits).",
            "Add vCPUs (the guide's Recommended tier is 2-4 vCPU) or spread load over "
            "more nodes behind the UDP load balancer; size with `qpq-ops capacity plan`.",
        ),
    ),
    Runbook(
        anchor="memory",
        title="Memory usage",
        symptom="Available memory shrinks; at the end the kernel's OOM killer stops the "
        "server and clients reconnect in a burst.",
        checks=(
            "Does the server's resident memory (`process_resident_memory_bytes`) grow "
            "with connections and sessions, or without them (a leak)?",
            "Compare with the memory model: ~5 KB per connection + 256 MB base "
            "(`qpq-ops capacity plan`).",
            "Is the page cache or another process using the memory?",
        ),
        commands=(
            "free -m",
            "ps -o pid,rss,cmd -C qpq-server",
            "curl -s http://127.0.0.1:9090/metrics | grep -E "
            "'^(process_resident_memory_bytes|qpq_connections_active|qpq_sessions_active)'",
        ),
        fix=(
            "Add memory to match `qpq-ops capacity plan` for the real user count.",
            "If memory grows without load, restart the server in a quiet hour and file a "
            "bug with the metrics graph; keep `[quic] max_connections` at what the host "
            "can hold.",
        ),
    ),
    Runbook(
        anchor="disk_usage",
        title="Disk usage",
        symptom="The filesystem holding the data dir (the alert names its mountpoint) fills "
        "up. When it is full, SQLCipher commits fail and the server answers writes with "
        "errors. Other filesystems (a full /boot/efi) do not raise this alert.",
        checks=(
            "Is the alert's mountpoint really the data dir's (`df --output=target "
            "/path/to/data`)? If not, re-render the rules with `qpq-ops render alerts "
            "--data-mountpoint PATH`.",
            "What grows: the database and WAL, blobs (`qpq_blob_bytes`), old backups?",
        ),
        commands=(
            "df -h",
            "du -sh /path/to/data/qpq.db* /path/to/data/blobs",
            "qpq-ops backup list /path/to/backups",
        ),
        fix=(
            "Expand the volume (the guide sizes 50-100 GB NVMe for production); size "
            "retention with `qpq-ops capacity plan --retention-days N`.",
            "Prune old backups: `qpq-ops backup prune /path/to/backups --keep-last 14 --dry-run`, "
            "then without `--dry-run`.",
            "Shorten message and blob retention if the plan allows it.",
        ),
    ),
    Runbook(
        anchor="disk_io_latency",
        title="Disk I/O latency",
        symptom="Storage commits take long: message sends and fetches wait on the "
        "database, so RPC latency rises while CPU stays low.",
        checks=(
            "Is the device saturated (`iostat -x`, `%util`, `await`)?",
            "Is a backup or another I/O-heavy job running at the same time?",
            "Is the data dir on network or spinning storage instead of local SSD?",
        ),
        commands=(
            "iostat -x 5 3",
            "curl -s http://127.0.0.1:9090/metrics | grep qpq_db_write_duration_seconds",
        ),
        fix=(
            "Move the data directory to local NVMe SSD (the guide's Recommended tier).",
            "Schedule backups outside peak hours.",
            "Raise SQLCipher's `PRAGMA wal_autocheckpoint` (e.g. 2000) for burst writes.",
        ),
    ),
    Runbook(
        anchor="delivery_queue_depth",
        title="Delivery queue depth",
        symptom="Messages pile up for delivery: recipients do not fetch, or fetches do not "
        "keep up with enqueues.",
        checks=(
            "Compare enqueue and fetch rates (Traffic row): is fetch far below enqueue?",
            "Do a few recipients hold most of the queue (stale accounts, lost devices)?",
            "Are fetches failing (RPC errors by operation, `op=fetch`)?",
        ),
        commands=(
            f"qpq-ops check-triggers --prometheus-url {_PROM} --json",
            "curl -s http://127.0.0.1:9090/metrics | grep -E "
            "'^(qpq_delivery_queue_depth|qpq_delivery_waiters|qpq_fetch_total)'",
        ),
        fix=(
            "Investigate stale queues; expire messages of accounts that never fetch "
            "according to your retention policy.",
            "If fetches fail, fix their cause first (see the error codes on the "
            "dashboard).",
        ),
    ),
    Runbook(
        anchor="rate_limit_hits",
        title="Rate-limit hits",
        symptom="Many requests are refused by the rate limiter: either abuse, or "
        "legitimate clients hitting limits that are too tight.",
        checks=(
            "One or a few sources, or everyone? Check the server log for the refused "
            "accounts and addresses.",
            "Did a client release change its request pattern?",
        ),
        commands=(
            "journalctl -u qpq-server --since -15min | grep -i rate",
            "grep -A5 '^\\[rate_limit\\]' /path/to/data/qpq-server.toml",
        ),
        fix=(
            "Abuse: block the sources at the firewall or load balancer.",
            "Legitimate load: raise `[rate_limit]` rates and bursts, then "
            "`qpq-server check-config` and restart.",
        ),
    ),
    Runbook(
        anchor="login_failures",
        title="Login failures",
        symptom="Failed logins (bad password, unknown user, bad token) per minute are high: "
        "a brute-force or credential-stuffing attempt, or clients with a stale auth "
        "token after a rotation.",
        checks=(
            "Did an auth-token rotation just happen? Old clients fail with a bad token "
            "until they update (the previous token is accepted during rotation).",
            "From which addresses? Many addresses with unknown users suggest stuffing.",
        ),
        commands=(
            "journalctl -u qpq-server --since -15min | grep -i login",
            "qpq-ops rotate auth-token --config /path/to/data/qpq-server.toml --dry-run",
        ),
        fix=(
            "Block the attacking sources; tighten the per-address `[rate_limit]`.",
            "After a rotation, finish it only when clients have the new token "
            "(`qpq-ops rotate auth-token --finish`).",
        ),
    ),
    Runbook(
        anchor="connections",
        title="Connections vs cap",
        symptom="Open QUIC connections approach `[quic] max_connections`; at the cap new "
        "clients are refused.",
        checks=(
            "Is the growth real users (sessions grow too) or idle connections held open?",
            "Is the file-descriptor limit high enough for the cap (`qpq-ops tune "
            "ulimits --check`)?",
        ),
        commands=(
            "curl -s http://127.0.0.1:9090/metrics | grep -E "
            "'^(qpq_connections_active|qpq_connections_max|qpq_sessions_active)'",
            "qpq-ops tune ulimits --check",
            "ss -uan 'sport = :7000' | wc -l",
        ),
        fix=(
            "Scale horizontally: add a node behind the UDP load balancer (sticky on "
            "client address or connection ID).",
            "If the host has CPU and memory to spare, raise `[quic] max_connections` "
            "(and `nofile` with it) and restart.",
        ),
    ),
    Runbook(
        anchor="tls_handshake_latency",
        title="TLS handshake latency",
        symptom="New connections take long to establish: clients see slow connects or "
        "time-outs, while established sessions may still work.",
        checks=(
            "Is CPU high (handshakes are CPU-bound)? See the cpu runbook.",
            "Is there packet loss on the path (UDP receive-buffer errors, network)?",
            "Is `[quic] max_handshakes_in_flight` reached during a reconnect storm?",
        ),
        commands=(
            f"qpq-ops check-triggers --prometheus-url {_PROM}",
            "nstat -az UdpRcvbufErrors UdpInErrors",
        ),
        fix=(
            "Add CPU or nodes; make sure the UDP buffer sysctls are applied "
            "(`qpq-ops tune sysctl --check`).",
            "After an outage, let clients reconnect gradually (retry = \"always\" makes "
            "address validation cheap under a flood).",
        ),
    ),
    Runbook(
        anchor="process_cpu",
        title="Worker CPU",
        symptom="One qpq worker process is near one full core: its requests and handshakes "
        "queue behind each other although the host's CPU (the cpu trigger) may read 25 % "
        "on four cores. aioquic runs one event loop per process.",
        checks=(
            "How many workers run (`[server] workers`), and is the busy one always the "
            "same (one hot account or connection) or all of them (real load)?",
            "Is there a handshake storm or a login brute force (see those runbooks)?",
        ),
        commands=(
            f"qpq-ops check-triggers --prometheus-url {_PROM} --trigger process_cpu",
            "top -H -p \"$(cat /path/to/data/qpq-server.pid)\"",
        ),
        fix=(
            "Run more worker processes on the same port: `[server] workers = \"auto\"` "
            "(one per usable core), then reload; beyond the host's cores, add nodes.",
            "Size workers per host with `qpq-ops capacity plan`.",
        ),
    ),
    Runbook(
        anchor="federation",
        title="Federation peers",
        symptom="Messages to users of another domain are not delivered: a peer has been "
        "unreachable for 5 minutes (critical) or its outbound queue has kept growing for "
        "15 minutes (warning). Nothing is lost: relays wait in the durable per-peer queue "
        "and are retried with backoff until they expire.",
        checks=(
            "Which peer? `qpq-ops doctor --config PATH` checks every peer's certificate "
            "and reachability; the dashboard's Federation row shows peer up and queue "
            "depth per peer.",
            "Is the peer's federation port (UDP 7001) reachable from here, and ours from "
            "there (firewall, address in `[[federation.peers]]`)?",
            "Has a federation certificate expired or been issued by another CA, or for "
            "another domain? Relays failing show in qpq_federation_relay_total by result "
            "here; the side that refuses counts qpq_federation_refused_total by reason.",
        ),
        commands=(
            "qpq-ops doctor --config /path/to/data/qpq-server.toml",
            f"qpq-ops check-triggers --prometheus-url {_PROM} --trigger federation",
        ),
        fix=(
            "Fix the path (firewall, address) or ask the peer's operator to; the queue "
            "drains by itself once the peer answers.",
            "Rotate an expired or foreign certificate: `qpq-ops rotate federation "
            "--config PATH` (docs/operations/federation.md).",
        ),
    ),
    Runbook(
        anchor="instance_down",
        title="Target down",
        symptom="Prometheus cannot scrape a qpq server or a node_exporter: the process is "
        "stopped or crashed, or the metrics port is unreachable. Every other alert of "
        "that instance goes quiet with it.",
        checks=(
            "Is the process running (`systemctl status qpq-server`, `docker-compose ps`)?",
            "Does `/readyz` answer on the metrics port from the Prometheus host?",
            "Did the host reboot, or did the OOM killer stop the process (`dmesg`)?",
        ),
        commands=(
            "systemctl status qpq-server prometheus-node-exporter",
            "curl -fsS http://127.0.0.1:9090/readyz",
            "qpq-server check-config /path/to/data/qpq-server.toml",
            "docker-compose -f docker-compose.prod.yml ps",
        ),
        fix=(
            "Fix what `check-config` or the log reports, then start the service again.",
            "If the database is damaged, restore the last good backup "
            "(`qpq-ops restore ARCHIVE --config PATH`).",
        ),
    ),
    Runbook(
        anchor="udp_receive_buffer_errors",
        title="UDP receive-buffer errors",
        symptom="The kernel drops incoming UDP datagrams because the socket receive buffer "
        "is full. QUIC recovers by retransmitting, so users see slowness, not errors.",
        checks=(
            "Are the sysctls applied (`net.core.rmem_max`, `net.core.rmem_default`)?",
            "Is the server CPU-bound, so that it drains its socket too slowly?",
        ),
        commands=(
            "qpq-ops tune sysctl --check",
            "sysctl net.core.rmem_max net.core.rmem_default",
            "nstat -az UdpRcvbufErrors",
        ),
        fix=(
            "Write and apply the tuning: `qpq-ops tune sysctl --write "
            "/etc/sysctl.d/99-qpq.conf && sysctl --system`, then restart the server so "
            "its socket gets the larger buffer.",
            "If CPU is the cause, see the cpu runbook.",
        ),
    ),
    Runbook(
        anchor="tls_cert_expiry",
        title="TLS certificate expiry",
        symptom="The serving certificate's notAfter is near: warning within "
        f"{duration_text(TLS_EXPIRY_WARNING_S)}, critical within "
        f"{duration_text(TLS_EXPIRY_CRITICAL_S)}. After it passes, clients refuse to "
        "connect.",
        checks=(
            "Which certificate does the server serve (`[server] tls_cert`)?",
            "Is automatic renewal (if any) failing?",
        ),
        commands=(
            "openssl x509 -noout -enddate -in /path/to/data/tls/cert.pem",
            "qpq-ops rotate tls --config /path/to/data/qpq-server.toml --dry-run",
        ),
        fix=(
            "Rotate: `qpq-ops rotate tls --config PATH` (the server reloads the "
            "certificate on SIGHUP without dropping connections); see "
            "key-rotation.md.",
        ),
    ),
    Runbook(
        anchor="backup_stale",
        title="Stale or missing backup",
        symptom="No `qpq-ops backup create` has succeeded on the node for over "
        f"{duration_text(BACKUP_MAX_AGE_S)}, or none was ever recorded. A disk failure now "
        "would lose data.",
        checks=(
            "Does the backup job run (cron or systemd timer), and what does its log say?",
            "Is the destination full or unreachable?",
            "Does node_exporter read the directory the backup writes `qpq_backup.prom` "
            "into (default /var/lib/prometheus/node-exporter)?",
        ),
        commands=(
            "qpq-ops backup create --config /path/to/data/qpq-server.toml "
            "--dest /path/to/backups",
            "qpq-ops backup list /path/to/backups",
            "cat /var/lib/prometheus/node-exporter/qpq_backup.prom",
        ),
        fix=(
            "Run a backup by hand now, then fix the schedule or the destination.",
            "On a new node, run the first backup right after deploying.",
            "Verify a recent archive: `qpq-ops backup verify ARCHIVE`.",
        ),
    ),
)

_BY_ANCHOR = {runbook.anchor: runbook for runbook in RUNBOOKS}


def runbook_for(anchor: str) -> Runbook:
    """The runbook of an alert's anchor; KeyError names a missing one."""
    try:
        return _BY_ANCHOR[anchor]
    except KeyError:
        raise KeyError(f"no runbook for {anchor!r} in qpq_ops/render/runbooks.py") from None
