"""The capacity plan re-run on observed load, now and along the load's trend.

The observed peak of concurrent connections and of the message rate (deployment-wide)
replace `--users` and `--msgs-per-user-hour` in `qpq_ops.capacity.plan`; both peaks are
moved along their Theil-Sen trends day by day to the horizon, and every day the plan
needs more workers or hosts than the day before is reported with its date.

Workers are worker processes: one aioquic process uses one core, so a plan's vCPUs are
its workers. Hosts: one while the plan fits a single-node tier, else vCPUs spread over
nodes of `SINGLE_NODE_MAX_VCPUS`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from qpq_ops.calibration import REFERENCE, Calibration
from qpq_ops.capacity import (
    BEYOND_ONE_NODE,
    SINGLE_NODE_MAX_VCPUS,
    CapacityInputs,
    CapacityPlan,
    plan,
)
from qpq_ops.forecast.fit import DAY, Series, fit_line
from qpq_ops.forecast.trend import iso_date

__all__ = ["DEFAULT_INPUTS", "CapacityOutlook", "CapacityPoint", "capacity_outlook"]

# Storage-side inputs Prometheus cannot observe, used when no --plan file is given; they
# do not change workers or hosts (those follow connections and message rate).
DEFAULT_INPUTS = CapacityInputs(users=1, msgs_per_user_hour=0, avg_msg_bytes=1_000,
                                blob_uploads_per_day=0, avg_blob_mb=0, retention_days=30)


@dataclass(frozen=True)
class CapacityPoint:
    at: float
    users: int
    msgs_per_hour: float
    plan: CapacityPlan

    @property
    def workers(self) -> int:
        return self.plan.vcpus

    @property
    def hosts(self) -> int:
        if self.plan.tier != BEYOND_ONE_NODE:
            return 1
        return math.ceil(self.plan.vcpus / SINGLE_NODE_MAX_VCPUS)

    def to_json(self) -> dict[str, object]:
        return {"date": iso_date(self.at), "at": self.at, "peak_users": self.users,
                "peak_msgs_per_hour": self.msgs_per_hour, "workers": self.workers,
                "hosts": self.hosts, "vcpus": self.plan.vcpus, "tier": self.plan.tier,
                "memory_bytes": self.plan.memory_bytes}


@dataclass(frozen=True)
class CapacityOutlook:
    now: CapacityPoint
    horizon: CapacityPoint
    changes: tuple[CapacityPoint, ...]
    """the first day each larger (workers, hosts) is needed, within the horizon"""
    users_per_day: float
    msgs_per_hour_per_day: float
    notes: tuple[str, ...]

    def summary(self) -> str:
        if not self.changes:
            return (f"{self.now.workers} worker(s) on {self.now.hosts} host(s) suffice "
                    f"until {iso_date(self.horizon.at)}")
        steps = "; ".join(f"{c.workers} worker(s) on {c.hosts} host(s) from {iso_date(c.at)}"
                          for c in self.changes)
        return f"now {self.now.workers} worker(s) on {self.now.hosts} host(s); {steps}"

    def to_json(self) -> dict[str, object]:
        return {"now": self.now.to_json(), "horizon": self.horizon.to_json(),
                "changes": [c.to_json() for c in self.changes],
                "users_per_day": self.users_per_day,
                "msgs_per_hour_per_day": self.msgs_per_hour_per_day,
                "summary": self.summary(), "notes": list(self.notes)}


def _point(base: CapacityInputs, at: float, users: float, msgs_per_hour: float,
           calibration: Calibration | None) -> CapacityPoint:
    peak_users = max(1, math.ceil(users))
    rate = max(0.0, msgs_per_hour)
    inputs = dataclasses.replace(base, users=peak_users,
                                 msgs_per_user_hour=rate / peak_users)
    return CapacityPoint(at, peak_users, rate, plan(inputs, calibration))


def capacity_outlook(users: Series, msgs_per_hour: Series, *, now: float, horizon_s: float,
                     base: CapacityInputs = DEFAULT_INPUTS,
                     calibration: Calibration | None = REFERENCE) -> CapacityOutlook | None:
    """None when no connection count was observed (nothing to plan from). Plans use
    qpq's measured model (`calibration`; the shipped reference by default), or the
    guide's worksheet with `calibration=None`."""
    if not users or users.peak is None or users.peak <= 0:
        return None
    notes: list[str] = []
    if base == DEFAULT_INPUTS:
        notes.append("storage inputs not given (--plan FILE): assumed 1,000-byte messages, "
                     "no files, 30-day retention; tier and disk depend on them, workers and "
                     "hosts do not")
    user_slope = fit_line(users, now).slope_per_day if len(users) > 1 else 0.0
    peak_rate = msgs_per_hour.peak if msgs_per_hour else None
    if peak_rate is None:
        notes.append("no qpq_enqueue_total history: message rate taken as 0")
        peak_rate, rate_slope = 0.0, 0.0
    else:
        rate_slope = fit_line(msgs_per_hour, now).slope_per_day if len(msgs_per_hour) > 1 else 0
    peak_users = users.peak

    def at(day: int) -> CapacityPoint:
        return _point(base, now + day * DAY, peak_users + user_slope * day,
                      peak_rate + rate_slope * day, calibration)

    current = at(0)
    days = max(0, int(horizon_s // DAY))
    changes: list[CapacityPoint] = []
    last = current
    for day in range(1, days + 1):
        point = at(day)
        if (point.workers, point.hosts) > (last.workers, last.hosts):
            changes.append(point)
        last = point
    horizon = _point(base, now + horizon_s, peak_users + user_slope * horizon_s / DAY,
                     peak_rate + rate_slope * horizon_s / DAY, calibration)
    return CapacityOutlook(current, horizon, tuple(changes), user_slope, rate_slope,
                           tuple(notes))
