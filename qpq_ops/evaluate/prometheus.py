"""Evaluate the triggers against a Prometheus: every query concurrently, one deadline.

Every target of the scope's jobs (from `up`) gets a row per trigger of its source, so a
node that is down, or an instance missing a metric, reads no-data, never ok; instances
that have series but no `up` of their own (federated or honor_labels data) get rows too.
An optional trigger (`Trigger.optional`: federation) gets rows only where its series
exist; where none do it does not apply, and a trigger without any row is listed as
skipped with its reason (neither no-data nor a silent ok).

For a sustained trigger (`sustain_s > 0`) the state comes from the least bad value over
the window, `min_over_time((expr)[W:step])` (max for "below" triggers), and only when the
series covers the whole window (`count_over_time` of the same subquery). A value beyond
a threshold whose window has not been observed yet (Prometheus started three minutes
ago with CPU at 95 %) is no-data "not sustained yet", never a silent ok. The subquery
step is a twentieth of the window (15 s for 5 minutes, about one scrape interval), so a
dip shorter than a step can go unseen.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from qpq_ops.errors import SourceError
from qpq_ops.evaluate.model import Evaluation, TriggerResult
from qpq_ops.evaluate.prometheus_client import PrometheusQuerier, PromSample
from qpq_ops.triggers import DEFAULT_SCOPE, TRIGGERS, Direction, Quantile, Scope, State, Trigger

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


def _selector(instance: str | None) -> str:
    return "" if instance is None else f'instance="{_quote(instance)}"'


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _regex_quote(value: str) -> str:
    """A job name as a literal inside a PromQL regex string."""
    return _quote(re.escape(value))


@dataclass(frozen=True)
class _Plan:
    trigger: Trigger
    instance: str | None
    current: str
    sustained: str | None
    count: str | None
    window: SustainWindow | None


def _plans(triggers: Sequence[Trigger], instances: Sequence[str | None], scope: Scope,
           scale: float) -> list[_Plan]:
    plans = []
    for trigger in triggers:
        for instance in instances:
            expr = trigger.expr_in(scope, _selector(instance))
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
        now = trigger.state_for(current)
        if now is State.OK:
            # the least bad value over any window is no worse than the current one
            note = f"{held:g} s of data in the {seconds:g} s window; ok now"
            return TriggerResult(trigger, instance, now, current, current=current,
                                 note=note)
        note = (f"not sustained yet: {held:g} s of data in the {seconds:g} s window"
                if now is not State.NO_DATA else "no current value")
        return TriggerResult(trigger, instance, State.NO_DATA, None, current=current,
                             note=note)
    state = trigger.state_for(least_bad)
    note = f"least bad value over {seconds:g} s"
    return TriggerResult(trigger, instance, state, least_bad, current=current, note=note)


def _absent(trigger: Trigger, instance: str | None) -> TriggerResult:
    return TriggerResult(trigger, instance, State.NO_DATA, None,
                         note="no series: metric absent or too few samples ("
                         + ", ".join(trigger.metrics) + ")")


def _results_for(plan: _Plan, current: list[PromSample], sustained: list[PromSample],
                 count: list[PromSample], targets: dict[str, float]) -> list[TriggerResult]:
    """Rows for one plan; `targets` maps each `up` instance of the trigger's job to up."""
    now = _by_instance(current)
    if plan.trigger.optional:
        # Rows only where the feature exports series: elsewhere it does not apply (an
        # instance that is down reads no-data in every other trigger already).
        return [_instant_result(plan.trigger, i, v) for i, v in sorted(now.items())
                if targets.get(i, 1.0) == 1.0]
    expected = set(targets) if plan.instance is None else (
        {plan.instance} & set(targets))
    if not now and not expected:
        return [_absent(plan.trigger, plan.instance)]
    least, counts = _by_instance(sustained), _by_instance(count)
    results = []
    for instance in sorted(set(now) | expected):
        if targets.get(instance, 1.0) != 1.0:
            results.append(TriggerResult(
                plan.trigger, instance, State.NO_DATA, None,
                note="target down: Prometheus cannot scrape it (up == 0)"))
        elif instance not in now:
            results.append(_absent(plan.trigger, instance))
        elif plan.window is None:
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
    scope: Scope = DEFAULT_SCOPE,
    timeout: float = 10.0,
    sustain_scale: float = 1.0,
    at: float | None = None,
) -> Evaluation:
    """Evaluate `triggers` at one instant; each of `instances` separately (every target
    of the scope's jobs, and every instance with series, if empty).

    Raises `SourceError` (one line) when Prometheus cannot answer every query in
    `timeout` seconds, or answers an error or something that is not a query result.
    """
    when = time.time() if at is None else at
    plans = _plans(triggers, list(instances) or [None], scope, sustain_scale)
    querier = PrometheusQuerier(url, timeout)
    pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="promql")
    try:
        def submit(expr: str | None) -> Future[list[PromSample]] | None:
            query: Callable[[str, float], list[PromSample]] = querier.query
            return None if expr is None else pool.submit(query, expr, when)

        jobs = sorted({scope.qpq_job, scope.node_job})
        up = submit("up{job=~\"" + "|".join(_regex_quote(j) for j in jobs) + "\"}")
        futures = [(p, submit(p.current), submit(p.sustained), submit(p.count)) for p in plans]
        pending = [f for row in futures for f in row[1:] if f is not None]
        assert up is not None
        pending.append(up)
        _done, not_done = wait(pending, timeout=timeout)
        if not_done:
            raise SourceError(
                f"Prometheus at {querier.url} did not answer within {timeout:g} s"
            )
        targets: dict[str, dict[str, float]] = {}
        for sample in up.result():
            targets.setdefault(sample.labels.get("job", ""), {})[
                sample.labels.get("instance", "")] = sample.value
        results: list[TriggerResult] = []
        for plan, current, sustained, count in futures:
            assert current is not None
            results += _results_for(
                plan, current.result(),
                sustained.result() if sustained else [],
                count.result() if count else [],
                targets.get(scope.job(plan.trigger.source), {}),
            )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        querier.close()
    present = {r.trigger.id for r in results}
    skipped = tuple(t.id for t in triggers if t.optional and t.id not in present)
    note = "; ".join(f"{t.id}: {t.optional}" for t in triggers if t.id in skipped)
    return Evaluation("prometheus", querier.url, when, tuple(results), skipped, note)
