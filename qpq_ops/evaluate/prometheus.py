"""Evaluate the triggers against a Prometheus: every query concurrently, one deadline.

For a sustained trigger (`sustain_s > 0`) the state comes from the least bad value over
the window, `min_over_time((expr)[W:step])` (max for "below" triggers), and only when the
series covers the whole window (`count_over_time` of the same subquery): a CPU at 95 %
for two minutes of a five-minute window is not yet "sustained". The subquery step is a
twentieth of the window (15 s for 5 minutes, about one scrape interval), so a dip shorter
than a step can go unseen.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from qpq_ops.errors import SourceError
from qpq_ops.evaluate.model import Evaluation, TriggerResult
from qpq_ops.evaluate.prometheus_client import PrometheusQuerier, PromSample
from qpq_ops.triggers import TRIGGERS, Direction, Quantile, State, Trigger

__all__ = ["SustainWindow", "evaluate_prometheus", "sustain_window"]

_STEPS_PER_WINDOW = 20


@dataclass(frozen=True)
class SustainWindow:
    window_ms: int
    step_ms: int

    @property
    def required_points(self) -> int:
        """Subquery points that prove the condition held for the window (to one step)."""
        return self.window_ms // self.step_ms - 1

    def range(self) -> str:
        return f"[{self.window_ms}ms:{self.step_ms}ms]"


def sustain_window(trigger: Trigger, scale: float = 1.0) -> SustainWindow:
    """The trigger's window, optionally compressed by `scale` (tests only)."""
    window_ms = max(1000, round(trigger.sustain_s * scale * 1000))
    return SustainWindow(window_ms, max(100, window_ms // _STEPS_PER_WINDOW))


def _selector(job: str | None, instance: str | None) -> str:
    parts = []
    if job is not None:
        parts.append(f'job="{_quote(job)}"')
    if instance is not None:
        parts.append(f'instance="{_quote(instance)}"')
    return ",".join(parts)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


@dataclass(frozen=True)
class _Plan:
    trigger: Trigger
    instance: str | None
    current: str
    sustained: str | None
    count: str | None
    window: SustainWindow | None


def _plans(triggers: Sequence[Trigger], instances: Sequence[str | None], job: str | None,
           scale: float) -> list[_Plan]:
    plans = []
    for trigger in triggers:
        for instance in instances:
            expr = trigger.expr_with_selector(_selector(job, instance))
            if trigger.sustain_s > 0:
                window = sustain_window(trigger, scale)
                agg = "min_over_time" if trigger.direction is Direction.ABOVE else "max_over_time"
                plans.append(_Plan(trigger, instance, expr,
                                   f"{agg}(({expr}){window.range()})",
                                   f"count_over_time(({expr}){window.range()})", window))
            else:
                plans.append(_Plan(trigger, instance, expr, None, None, None))
    return plans


def _by_instance(samples: list[PromSample]) -> dict[str, float]:
    return {s.labels.get("instance", ""): s.value for s in samples}


def _instant_result(trigger: Trigger, instance: str, value: float) -> TriggerResult:
    if math.isnan(value) and isinstance(trigger.measure, Quantile):
        # The histogram exists but saw no observation in its window: nothing is slow.
        return TriggerResult(trigger, instance, State.OK, None,
                             note=f"no observations in the last {trigger.measure.window}")
    return TriggerResult(trigger, instance, trigger.state_for(value), value)


def _sustained_result(trigger: Trigger, instance: str, current: float,
                      least_bad: float | None, count: float | None,
                      window: SustainWindow) -> TriggerResult:
    seconds = window.window_ms / 1000
    held = (count or 0) * window.step_ms / 1000
    if least_bad is None or count is None or count < window.required_points:
        note = f"{held:g} s of data in the {seconds:g} s window: not sustained"
        state = State.NO_DATA if math.isnan(current) else State.OK
        return TriggerResult(trigger, instance, state, current, current=current, note=note)
    state = trigger.state_for(least_bad)
    note = f"least bad value over {seconds:g} s"
    return TriggerResult(trigger, instance, state, least_bad, current=current, note=note)


def _results_for(plan: _Plan, current: list[PromSample], sustained: list[PromSample],
                 count: list[PromSample]) -> list[TriggerResult]:
    now = _by_instance(current)
    if not now:
        return [TriggerResult(plan.trigger, plan.instance, State.NO_DATA, None,
                              note="no series: metric absent or too few samples ("
                              + ", ".join(plan.trigger.metrics) + ")")]
    least, counts = _by_instance(sustained), _by_instance(count)
    results = []
    for instance in sorted(now):
        if plan.window is None:
            results.append(_instant_result(plan.trigger, instance, now[instance]))
        else:
            results.append(_sustained_result(plan.trigger, instance, now[instance],
                                             least.get(instance), counts.get(instance),
                                             plan.window))
    return results


def evaluate_prometheus(
    url: str,
    *,
    triggers: Sequence[Trigger] = TRIGGERS,
    instances: Sequence[str] = (),
    job: str | None = None,
    timeout: float = 10.0,
    sustain_scale: float = 1.0,
    at: float | None = None,
) -> Evaluation:
    """Evaluate `triggers` at one instant; each of `instances` separately (all if empty).

    Raises `SourceError` (one line) when Prometheus cannot answer every query in
    `timeout` seconds, or answers an error or something that is not a query result.
    """
    when = time.time() if at is None else at
    plans = _plans(triggers, list(instances) or [None], job, sustain_scale)
    querier = PrometheusQuerier(url, timeout)
    pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="promql")
    try:
        def submit(expr: str | None) -> Future[list[PromSample]] | None:
            query: Callable[[str, float], list[PromSample]] = querier.query
            return None if expr is None else pool.submit(query, expr, when)

        futures = [(p, submit(p.current), submit(p.sustained), submit(p.count)) for p in plans]
        pending = [f for row in futures for f in row[1:] if f is not None]
        _done, not_done = wait(pending, timeout=timeout)
        if not_done:
            raise SourceError(
                f"Prometheus at {querier.url} did not answer within {timeout:g} s"
            )
        results: list[TriggerResult] = []
        for plan, current, sustained, count in futures:
            assert current is not None
            results += _results_for(
                plan, current.result(),
                sustained.result() if sustained else [],
                count.result() if count else [],
            )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        querier.close()
    return Evaluation("prometheus", querier.url, when, tuple(results))
