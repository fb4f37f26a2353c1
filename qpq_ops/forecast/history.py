"""Read measures' history from Prometheus with range queries, all under one deadline.

`PrometheusQuerier` (qpq_ops.evaluate) answers instant queries and translates every
failure into a one-line `SourceError`; `RangeQuerier` adds `query_range` with the same
translation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime

from qpq_ops.errors import SourceError
from qpq_ops.evaluate.prometheus_client import PrometheusQuerier
from qpq_ops.forecast.fit import Series

__all__ = ["MAX_POINTS", "RangeQuerier", "RangeResult", "fetch_ranges", "instance_matcher",
           "step_for"]

MAX_POINTS = 500
"""points per series: enough for a smooth chart and a stable fit, small enough to be fast"""
MIN_STEP_S = 60


def step_for(lookback_s: float) -> int:
    return max(MIN_STEP_S, int(lookback_s // MAX_POINTS))


def instance_matcher(instances: Sequence[str]) -> str:
    """'instance=~"a|b"' (values regex-escaped) or '' for every instance."""
    if not instances:
        return ""
    alternatives = "|".join(re.escape(i) for i in instances)
    return 'instance=~"' + alternatives.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class RangeResult:
    """One range query's series, keyed by their label sets (sorted tuples)."""

    series: Mapping[tuple[tuple[str, str], ...], Series]

    def by(self, label: str) -> dict[str, Series]:
        return {dict(k).get(label, ""): v for k, v in self.series.items()}


class RangeQuerier(PrometheusQuerier):
    def query_range(self, expr: str, start: float, end: float, step_s: int) -> RangeResult:
        with self._translated():
            raw: object = self._prom.custom_query_range(
                expr, start_time=datetime.fromtimestamp(start, UTC),
                end_time=datetime.fromtimestamp(end, UTC), step=f"{step_s}s",
            )
        bad = SourceError(f"Prometheus at {self.url} answered with an unexpected result shape")
        if not isinstance(raw, list):
            raise bad
        out: dict[tuple[tuple[str, str], ...], Series] = {}
        for item in raw:
            metric = item.get("metric") if isinstance(item, dict) else None
            values = item.get("values") if isinstance(item, dict) else None
            if not isinstance(metric, dict) or not isinstance(values, list):
                raise bad
            try:
                points = [(float(t), float(v)) for t, v in values]
            except (TypeError, ValueError):
                raise bad from None
            key = tuple(sorted((str(k), str(v)) for k, v in metric.items()))
            out[key] = Series.of(points)
        return RangeResult(out)


def fetch_ranges(url: str, exprs: Mapping[str, str], *, start: float, end: float,
                 step_s: int, timeout: float) -> dict[str, RangeResult]:
    """Run every named expression concurrently; SourceError if any fails or is late."""
    querier = RangeQuerier(url, timeout)
    pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="promql-range")
    try:
        futures = {name: pool.submit(querier.query_range, expr, start, end, step_s)
                   for name, expr in exprs.items()}
        _done, late = wait(futures.values(), timeout=timeout)
        if late:
            raise SourceError(f"Prometheus at {querier.url} did not answer within {timeout:g} s")
        return {name: future.result() for name, future in futures.items()}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        querier.close()
