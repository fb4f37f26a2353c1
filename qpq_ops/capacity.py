"""Capacity planning: qpq's measured model, or the scaling guide's worksheet, as pure functions.

`plan(CapacityInputs, calibration) -> CapacityPlan`. No I/O: the CLI reads options,
files, a calibration or Prometheus, this module only computes. With a `Calibration`
(qpq's own measured costs, `qpq_ops.calibration`) memory and CPU come from what qpq
costs; without one the guide's worksheet is applied as written (its 5 KB per connection
and 2,500 connections per vCPU are the Rust original's figures, not qpq's). Units are
SI (1 KB = 10^3 B, 1 MB = 10^6 B, 1 GB = 10^9 B); every output figure is in bytes, vCPUs
or counts.

Formulas (scaling guide, "Capacity planning worksheet"):
- storage per day = users x msgs/hr x 24 x avg_msg_size + blob_uploads x avg_blob_size
- DB growth per month = storage per day x 30
- memory estimate = concurrent_users x 5 KB + 256 MB base
- CPU estimate = 1 vCPU per ~2,500 concurrent connections (depends on message rate)

Beyond one host (measured model): the nodes share one PostgreSQL
(`[storage] backend = "postgres"`); `PostgresSizing` sizes it:
- backend = sqlcipher while one host holds every worker and the measured durable
  commits/s cover the needed ones; otherwise postgres;
- workers per host = ceil(workers / hosts) (never above cores per host);
- PostgreSQL connections = hosts x workers per host x (pool_size + 1 LISTEN) + 10 for
  qpq-ops and the admin; max_connections is that with 25 % headroom;
- PostgreSQL vCPUs = max(2, ceil(peak messages/s x measured PostgreSQL CPU per message
  / the `cpu` trigger's warning share)): the CPU per message is what bench/scale.py
  measured (`qpq_ops.calibration.POSTGRES_REFERENCE`, enqueue + fetch + ack);
- PostgreSQL memory = max(4 GB, 4 x 2 x `PG_HOT_WINDOW_S` of peak message bytes):
  shared_buffers (a quarter of it) holds the last 15 minutes of messages and their
  indexes (an assumption: most are fetched and deleted within minutes);
- PostgreSQL disk = storage for retention + 2 GB of WAL (`max_wal_size` 1 GB, twice).

Choices this module makes where the guide is silent (each visible in the plan):
- the peak factor multiplies concurrent users and message rate for memory, CPU and file
  descriptors; storage is a daily total and uses the average;
- retention storage is sized so the retained data stays under the `disk_usage`
  trigger's warning threshold (70 %), i.e. retained bytes / 0.70;
- the message-rate side of the CPU estimate assumes each message costs two requests
  (enqueue + fetch) and one vCPU serves `REQUESTS_PER_VCPU_S` requests per second;
- a tier fits when the needs are within its upper bounds (vCPU, memory, disk, users);
  the guide gives no ceiling for "Large" CPU, so one node stops at `SINGLE_NODE_MAX_VCPUS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from qpq_ops.calibration import POSTGRES_REFERENCE, Calibration, PostgresCost
from qpq_ops.errors import CapacityInputError
from qpq_ops.triggers import get_trigger

__all__ = [
    "BEYOND_ONE_NODE",
    "NOFILE",
    "SYSCTL",
    "TIERS",
    "CapacityInputs",
    "CapacityPlan",
    "MeasuredSizing",
    "MemoryModel",
    "PostgresSizing",
    "Tier",
    "measured_sizing",
    "plan",
    "postgres_sizing",
]

KB = 1_000
MB = 1_000_000
GB = 1_000_000_000

# Worksheet constants.
MEMORY_PER_USER_BYTES = 5 * KB
MEMORY_BASE_BYTES = 256 * MB
USERS_PER_VCPU = 2_500
DAYS_PER_MONTH = 30
# Assumption: aioquic serves ~1,300-1,900 bare round trips/s per core (aioquic-notes.md);
# with auth and storage, count 1,000 requests/s per vCPU.
REQUESTS_PER_VCPU_S = 1_000
REQUESTS_PER_MESSAGE = 2
SINGLE_NODE_MAX_VCPUS = 32
PG_MIN_VCPUS = 2
PG_MIN_MEMORY_BYTES = 4 * GB
PG_WAL_BYTES = 2 * GB
PG_HOT_WINDOW_S = 900
PG_EXTRA_CONNECTIONS = 10
PG_POOL_SIZE = 4  # [storage] pool_size's default (qpq_server.config.StorageConfig)

# Tuning section of the guide.
NOFILE = 65_536
SYSCTL: dict[str, int] = {
    "net.core.rmem_max": 26_214_400,
    "net.core.wmem_max": 26_214_400,
    "net.core.rmem_default": 1_048_576,
    "net.core.wmem_default": 1_048_576,
}

NR_OPEN_DEFAULT = 1_048_576
"""Linux's default fs.nr_open: no process may have more open files without raising it."""

BEYOND_ONE_NODE = "beyond one node: scale horizontally"

# Upper bounds of the inputs: beyond them a figure is a typo, not a deployment.
INPUT_MAX: dict[str, float] = {
    "users": 1e9,
    "msgs_per_user_hour": 1e5,
    "avg_msg_bytes": 1e8,
    "blob_uploads_per_day": 1e10,
    "avg_blob_mb": 1e5,
    "retention_days": 36_500,
    "peak_factor": 100,
}


@dataclass(frozen=True)
class CapacityInputs:
    """The worksheet's inputs; validated on construction."""

    users: int
    """expected concurrent users (connections)"""
    msgs_per_user_hour: float
    """messages sent per user per hour"""
    avg_msg_bytes: float
    """average message size in bytes (ciphertext on the wire)"""
    blob_uploads_per_day: float
    """file/blob uploads per day, all users"""
    avg_blob_mb: float
    """average blob size in MB (10^6 bytes)"""
    retention_days: int
    """days messages and blobs are kept"""
    peak_factor: float = 1.0
    """peak concurrent load / average load (>= 1)"""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise CapacityInputError(f.name, f"must be a number, got {value!r}")
            if not math.isfinite(value):
                raise CapacityInputError(f.name, f"must be finite, got {value!r}")
        for name in ("users", "retention_days"):
            if not float(getattr(self, name)).is_integer():
                raise CapacityInputError(name, f"must be a whole number, got {getattr(self, name)}")
        for name in ("users", "avg_msg_bytes", "retention_days"):
            if getattr(self, name) <= 0:
                raise CapacityInputError(name, f"must be greater than 0, got {getattr(self, name)}")
        for name in ("msgs_per_user_hour", "blob_uploads_per_day", "avg_blob_mb"):
            if getattr(self, name) < 0:
                raise CapacityInputError(name, f"must be 0 or more, got {getattr(self, name)}")
        if self.peak_factor < 1:
            raise CapacityInputError(
                "peak_factor", f"must be 1 or more (peak / average), got {self.peak_factor}"
            )
        for name, ceiling in INPUT_MAX.items():
            if getattr(self, name) > ceiling:
                raise CapacityInputError(
                    name, f"must be at most {ceiling:,.0f}, got {getattr(self, name):g}")


@dataclass(frozen=True)
class Tier:
    """A row of the guide's single-node sizing table; `None` upper bound = no ceiling."""

    name: str
    purpose: str
    vcpus_min: int
    vcpus_max: int | None
    memory_min_bytes: int
    memory_max_bytes: int | None
    disk_min_bytes: int
    disk_max_bytes: int | None
    users_max: int | None
    cpu: str
    memory: str
    disk: str
    network: str
    supports: str


TIERS: tuple[Tier, ...] = (
    Tier("Minimum", "development / small team", 1, 1, 512 * MB, 512 * MB, 10 * GB, 10 * GB,
         100, "1 vCPU", "512 MB", "10 GB SSD", "100 Mbps",
         "~100 concurrent users, light traffic"),
    Tier("Recommended", "production", 2, 4, 2 * GB, 4 * GB, 50 * GB, 100 * GB, 5_000,
         "2-4 vCPU", "2-4 GB", "50-100 GB NVMe SSD", "1 Gbps",
         "~1,000-5,000 concurrent users"),
    Tier("Large", "high traffic", 8, SINGLE_NODE_MAX_VCPUS, 8 * GB, 16 * GB, 500 * GB, None,
         None, "8+ vCPU", "8-16 GB", "500 GB+ NVMe SSD (RAID 10)", "10 Gbps",
         "~10,000+ concurrent users"),
)


@dataclass(frozen=True)
class MemoryModel:
    """The guide's per-item memory model (for comparison with the worksheet figure)."""

    connections_bytes: int
    sessions_bytes: int
    rate_limit_bytes: int
    waiters_bytes: int
    storage_pool_bytes: int
    base_process_bytes: int

    @property
    def total_bytes(self) -> int:
        return (self.connections_bytes + self.sessions_bytes + self.rate_limit_bytes
                + self.waiters_bytes + self.storage_pool_bytes + self.base_process_bytes)


@dataclass(frozen=True)
class CapacityPlan:
    inputs: CapacityInputs
    peak_users: int
    message_bytes_per_day: int
    blob_bytes_per_day: int
    storage_per_day_bytes: int
    db_growth_per_month_bytes: int
    retained_bytes: int
    """storage per day x retention days"""
    retention_storage_bytes: int
    """retained bytes with headroom: the volume to provision for data"""
    disk_headroom_fill_ratio: float
    memory_bytes: int
    memory_model: MemoryModel
    peak_messages_per_s: float
    vcpus_for_connections: int
    vcpus_for_messages: int
    vcpus: int
    tier: str
    """a `TIERS` name, or `BEYOND_ONE_NODE`"""
    host_vcpus: int
    """what to provision: the tier's floor or the need, whichever is larger"""
    host_memory_bytes: int
    host_disk_bytes: int
    nofile: int
    sysctl: dict[str, int]
    measured: MeasuredSizing | None = None
    """qpq's measured model (memory, vcpus and tier above follow it); None = the guide"""


@dataclass(frozen=True)
class MeasuredSizing:
    """Sizing from qpq's own measured costs (`qpq-ops capacity calibrate`)."""

    memory_bytes: int
    """all workers' base RSS + peak connections x RSS per idle connection"""
    cpu_cores: float
    """server CPU at the peak message rate (enqueue + fetch + ack per message)"""
    workers: int
    """worker processes, each kept under the process_cpu warning share of its core"""
    cores_per_host: int
    hosts: int
    reconnect_storm_s: float
    """time for every peak user to reconnect and log in after a restart, all workers busy"""
    commits_needed_per_s: float
    """durable commits at the peak (one per enqueue and one per ack)"""
    commits_measured_per_s: float
    calibration_machine: dict[str, str]
    workers_per_host: int = 1
    """`[server] workers` on each host"""
    storage_backend: str = "sqlcipher"
    """sqlcipher while one host (and its measured commits/s) suffices, else postgres"""
    postgres: PostgresSizing | None = None
    """the shared database, when storage_backend is postgres"""


@dataclass(frozen=True)
class PostgresSizing:
    """The PostgreSQL host the nodes share (formulas in the module docstring)."""

    vcpus: int
    memory_bytes: int
    disk_bytes: int
    connections: int
    """hosts x workers per host x (pool_size + 1) + qpq-ops"""
    max_connections: int
    """connections with 25 % headroom: the `max_connections` setting"""
    commits_per_s: float
    cpu_cores: float = 0.0
    """PostgreSQL CPU at the peak message rate (measured CPU per message)"""
    cpu_s_per_message: float = 0.0
    """the measured PostgreSQL CPU per message delivered it is sized with"""
    measured_by: str = ""
    """where that figure comes from"""

def memory_model(users: int) -> MemoryModel:
    """The guide's model: 5 KB/connection, 200 B/session, 100 B per rate-limit entry and
    per waiter, 50 MB storage pool, 30 MB base process."""
    return MemoryModel(
        connections_bytes=users * 5 * KB,
        sessions_bytes=users * 200,
        rate_limit_bytes=users * 100,
        waiters_bytes=users * 100,
        storage_pool_bytes=50 * MB,
        base_process_bytes=30 * MB,
    )


def _fits(tier: Tier, vcpus: int, memory: int, disk: int, users: int) -> bool:
    def within(need: int, ceiling: int | None) -> bool:
        return ceiling is None or need <= ceiling

    return (within(vcpus, tier.vcpus_max) and within(memory, tier.memory_max_bytes)
            and within(disk, tier.disk_max_bytes) and within(users, tier.users_max))


def measured_sizing(inputs: CapacityInputs, calibration: Calibration,
                    cores_per_host: int = 8) -> MeasuredSizing:
    """What qpq itself costs at the peak, from a calibration."""
    peak_users = math.ceil(inputs.users * inputs.peak_factor)
    peak_rate = inputs.users * inputs.msgs_per_user_hour / 3600 * inputs.peak_factor
    cpu = peak_rate * calibration.cpu_s_per_message
    # one aioquic worker uses one core; keep each under the process_cpu warning
    per_worker = get_trigger("process_cpu").warning / 100
    workers = max(1, math.ceil(cpu / per_worker))
    storm_cpu = peak_users * (calibration.cpu_s_per_handshake + calibration.cpu_s_per_login)
    hosts = max(1, math.ceil(workers / cores_per_host))
    backend = "sqlcipher" if hosts == 1 and 2 * peak_rate <= \
        calibration.durable_commits_per_s else "postgres"
    return MeasuredSizing(
        memory_bytes=workers * calibration.rss_base_bytes
        + peak_users * calibration.rss_per_connection_bytes,
        cpu_cores=cpu,
        workers=workers,
        cores_per_host=cores_per_host,
        hosts=hosts,
        reconnect_storm_s=storm_cpu / workers,
        commits_needed_per_s=2 * peak_rate,
        commits_measured_per_s=calibration.durable_commits_per_s,
        calibration_machine=dict(calibration.machine),
        workers_per_host=math.ceil(workers / hosts),
        storage_backend=backend,
    )


def postgres_sizing(measured: MeasuredSizing, peak_message_bytes_per_s: float,
                    retention_storage_bytes: int,
                    cost: PostgresCost = POSTGRES_REFERENCE) -> PostgresSizing:
    """The shared PostgreSQL for `measured`'s hosts and workers."""
    connections = (measured.hosts * measured.workers_per_host * (PG_POOL_SIZE + 1)
                   + PG_EXTRA_CONNECTIONS)
    peak_messages_per_s = measured.commits_needed_per_s / 2  # an enqueue and an ack each
    cpu = peak_messages_per_s * cost.cpu_s_per_message
    busy_share = get_trigger("cpu").warning / 100  # the host stays under its cpu warning
    return PostgresSizing(
        vcpus=max(PG_MIN_VCPUS, math.ceil(cpu / busy_share)),
        memory_bytes=max(PG_MIN_MEMORY_BYTES,
                         math.ceil(4 * 2 * peak_message_bytes_per_s * PG_HOT_WINDOW_S)),
        disk_bytes=retention_storage_bytes + PG_WAL_BYTES,
        connections=connections,
        max_connections=math.ceil(connections * 1.25),
        commits_per_s=measured.commits_needed_per_s,
        cpu_cores=cpu,
        cpu_s_per_message=cost.cpu_s_per_message,
        measured_by=cost.source,
    )


def _nofile(peak_users: int) -> int:
    # QUIC connections share one UDP socket, but the WebSocket bridge holds one TCP socket
    # per client: keep two descriptors per peak user, never below the guide's 65,536.
    need = 2 * peak_users
    return max(NOFILE, 1 << (need - 1).bit_length())


def plan(inputs: CapacityInputs, calibration: Calibration | None = None,
         cores_per_host: int = 8) -> CapacityPlan:
    """Size for `inputs`: with `calibration`, memory and vCPUs (and so the tier) from
    qpq's measured costs; without, the guide's worksheet exactly. Pure; figures are
    rounded up to whole units."""
    peak_users = math.ceil(inputs.users * inputs.peak_factor)
    message_bytes = math.ceil(
        inputs.users * inputs.msgs_per_user_hour * 24 * inputs.avg_msg_bytes
    )
    blob_bytes = math.ceil(inputs.blob_uploads_per_day * inputs.avg_blob_mb * MB)
    per_day = message_bytes + blob_bytes
    retained = per_day * inputs.retention_days
    fill_ratio = get_trigger("disk_usage").warning / 100
    retention_storage = math.ceil(retained / fill_ratio)

    memory = peak_users * MEMORY_PER_USER_BYTES + MEMORY_BASE_BYTES
    peak_rate = inputs.users * inputs.msgs_per_user_hour / 3600 * inputs.peak_factor
    vcpus_conn = max(1, math.ceil(peak_users / USERS_PER_VCPU))
    vcpus_msgs = max(1, math.ceil(peak_rate * REQUESTS_PER_MESSAGE / REQUESTS_PER_VCPU_S))
    vcpus = max(vcpus_conn, vcpus_msgs)
    measured = None
    if calibration is not None:
        measured = measured_sizing(inputs, calibration, cores_per_host)
        if measured.storage_backend == "postgres":
            measured = replace(measured, postgres=postgres_sizing(
                measured, peak_rate * inputs.avg_msg_bytes, retention_storage))
        memory, vcpus = measured.memory_bytes, measured.workers

    chosen = next(
        (t for t in TIERS if _fits(t, vcpus, memory, retention_storage, peak_users)), None
    )
    if chosen is None:
        tier_name, host_vcpus, host_memory = BEYOND_ONE_NODE, vcpus, memory
    else:
        tier_name = chosen.name
        host_vcpus = max(chosen.vcpus_min, vcpus)
        host_memory = max(chosen.memory_min_bytes, memory)
    host_disk = retention_storage if chosen is None else max(
        chosen.disk_min_bytes, retention_storage
    )

    nofile = _nofile(peak_users)
    sysctl = dict(SYSCTL)
    if nofile > NR_OPEN_DEFAULT:
        # no limit may exceed fs.nr_open: raise the kernel ceiling with the limit
        sysctl["fs.nr_open"] = nofile
    return CapacityPlan(
        inputs=inputs,
        peak_users=peak_users,
        message_bytes_per_day=message_bytes,
        blob_bytes_per_day=blob_bytes,
        storage_per_day_bytes=per_day,
        db_growth_per_month_bytes=per_day * DAYS_PER_MONTH,
        retained_bytes=retained,
        retention_storage_bytes=retention_storage,
        disk_headroom_fill_ratio=fill_ratio,
        memory_bytes=memory,
        memory_model=memory_model(peak_users),
        peak_messages_per_s=peak_rate,
        vcpus_for_connections=vcpus_conn,
        vcpus_for_messages=vcpus_msgs,
        vcpus=vcpus,
        tier=tier_name,
        host_vcpus=host_vcpus,
        host_memory_bytes=host_memory,
        host_disk_bytes=host_disk,
        nofile=nofile,
        sysctl=sysctl,
        measured=measured,
    )
