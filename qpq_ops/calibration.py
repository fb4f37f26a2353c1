"""qpq's own measured costs, the model `qpq-ops capacity plan --model measured` sizes with.

A `Calibration` is what `qpq-ops capacity calibrate` measured on one host against a real
server on loopback: resident memory of the process and per idle QUIC connection, server
CPU seconds per request (enqueue, fetch, ack), per QUIC/TLS handshake and per OPAQUE
login, and the durable commits per second the storage sustained, with the machine it
ran on. `REFERENCE` is the calibration shipped as the default (see its `machine`);
calibrate your own hardware and pass `--calibration FILE` for figures that fit it.

`load(path)` / `dump(calibration)` read and write the JSON `calibrate --out` writes;
a malformed file raises `CalibrationError` with a one-line message.

`POSTGRES_REFERENCE` is what one delivered message costs a shared PostgreSQL, measured
by `bench/scale.py` (the `postgres` sizing of `capacity plan` uses it).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from qpq_ops.errors import CalibrationError

__all__ = ["POSTGRES_REFERENCE", "REFERENCE", "Calibration", "PostgresCost", "dump",
           "load"]


@dataclass(frozen=True)
class Calibration:
    rss_base_bytes: int
    """resident memory of one idle server process with no connection"""
    rss_per_connection_bytes: int
    """extra resident memory per idle QUIC connection"""
    cpu_s_per_enqueue: float
    cpu_s_per_fetch: float
    cpu_s_per_ack: float
    cpu_s_per_handshake: float
    """server CPU of one QUIC/TLS handshake (connect, then close)"""
    cpu_s_per_login: float
    """server CPU of one OPAQUE login (both round trips)"""
    durable_commits_per_s: float
    """storage commits per second sustained by concurrent enqueues (a lower bound)"""
    machine: dict[str, str] = field(default_factory=dict)
    """where it was measured: cpu, cores, kernel, python, storage, date"""

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "machine":
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value) or value <= 0:
                raise CalibrationError(f"{f.name} must be a positive number, got {value!r}")

    @property
    def cpu_s_per_message(self) -> float:
        """One message delivered: enqueued once, fetched and acknowledged once."""
        return self.cpu_s_per_enqueue + self.cpu_s_per_fetch + self.cpu_s_per_ack


def dump(calibration: Calibration) -> str:
    return json.dumps(asdict(calibration), indent=2, sort_keys=True) + "\n"


def load(path: Path) -> Calibration:
    """The calibration in `path` (as written by `qpq-ops capacity calibrate --out`)."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise CalibrationError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{path} is not JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"{path} must hold a JSON object")
    known = {f.name for f in fields(Calibration)}
    missing = sorted(known - set(data) - {"machine"})
    if missing:
        raise CalibrationError(f"{path}: missing {', '.join(missing)}")
    extra = sorted(set(data) - known)
    if extra:
        raise CalibrationError(f"{path}: unknown key(s) {', '.join(extra)}")
    machine = data.get("machine", {})
    if not isinstance(machine, dict):
        raise CalibrationError(f"{path}: machine must be an object")
    try:
        return Calibration(**{**data, "machine": {str(k): str(v) for k, v in machine.items()}})
    except CalibrationError as exc:
        raise CalibrationError(f"{path}: {exc}") from None


# `qpq-ops capacity calibrate --seconds 20` on the reference machine below: a 2-vCPU
# KVM guest (Intel Xeon, 24 GB RAM, virtio disk, ext4) that other jobs shared while it
# ran, and client and server on the same two cores, so the CPU figures are upper bounds
# (a dedicated core does better). Recalibrate on your own hardware.
REFERENCE = Calibration(
    rss_base_bytes=65_187_840,
    rss_per_connection_bytes=78_786,
    cpu_s_per_enqueue=0.0020321,
    cpu_s_per_fetch=0.0011871,
    cpu_s_per_ack=0.0018348,
    cpu_s_per_handshake=0.0042647,
    cpu_s_per_login=0.0043902,
    durable_commits_per_s=176.8,
    machine={
        "cpu": "Intel(R) Xeon(R) Processor (2 vCPU KVM guest, shared)",
        "cores": "2",
        "memory": "24 GB",
        "storage": "virtio disk, ext4",
        "kernel": "6.18.44",
        "python": "3.11.7",
        "date": "2026-12-01",
        "seconds": "20",
        "idle_connections": "200",
    },
)


@dataclass(frozen=True)
class PostgresCost:
    """What one message delivered (enqueue + fetch + ack) costs a shared PostgreSQL."""

    cpu_s_per_message: float
    """CPU of the postmaster and its backends (qpq's connections, LISTEN included)"""
    source: str
    """the measurement it comes from"""
    machine: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not math.isfinite(self.cpu_s_per_message) or self.cpu_s_per_message <= 0:
            raise CalibrationError(f"cpu_s_per_message must be a positive number, got "
                                   f"{self.cpu_s_per_message!r}")


# `bench/scale.py --repeat 3` (8 connections, 8 s per scenario, three alternating rounds;
# README, "Scaling: workers and nodes"): PostgreSQL CPU (postmaster and backends) per
# enqueue+fetch+ack round trip, medians 0.27 ms (1 node, 1 worker), 0.31 ms (1 node, 2
# workers), 0.30 ms (2 nodes): 0.30 ms, the multi-node figure, since this sizing is for
# several nodes. Same shared 2-vCPU machine as REFERENCE, PostgreSQL 15 from Debian with
# its default settings (synchronous_commit = on), load generator and qpq on the same
# cores. A second run right after, with the box busier (load average 9.5), measured
# 0.51-0.80 ms per round: contention costs PostgreSQL CPU too (less batching), which a
# dedicated database host does not have.
POSTGRES_REFERENCE = PostgresCost(
    cpu_s_per_message=0.00030,
    source="bench/scale.py --repeat 3, PostgreSQL CPU per round trip, 2 nodes (median)",
    machine={
        "cpu": "Intel(R) Xeon(R) Processor (2 vCPU KVM guest, shared)",
        "cores": "2",
        "postgresql": "15 (Debian), default settings",
        "date": "2026-12-01",
    },
)
