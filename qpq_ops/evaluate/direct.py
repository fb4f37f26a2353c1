"""Direct mode: no Prometheus at hand, so scrape `/metrics` twice and compute.

The qpq server's page (and node_exporter's, when given) is scraped at the start and
after `sample_s` seconds; counters become rates over that interval and histograms a
quantile of the interval's observations. The qpq process's own metrics answer what they
can (worker CPU from `process_cpu_seconds_total`); host triggers need node_exporter
(`node_metrics_url`) and without it are listed once as skipped, not as failing rows.
A sustained trigger (CPU) that reads ok is ok (no window can be worse than now); one
that reads beyond a threshold is no-data "not sustained yet": the sample is no window.
The federation trigger is alike (its windows are in the measure), and on a server
without federation series it does not apply: listed as skipped, never no-data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import httpx

from qpq_ops.errors import ParseError, SourceError
from qpq_ops.evaluate.exposition import Exposition, compute, parse
from qpq_ops.evaluate.model import Evaluation, TriggerResult
from qpq_ops.triggers import (
    DEFAULT_SCOPE,
    TRIGGERS,
    FederationPeers,
    Quantile,
    Scope,
    Source,
    State,
    Trigger,
)

__all__ = ["evaluate_direct", "http_url", "metrics_endpoint", "scrape"]


def http_url(url: str) -> str:
    """`url` with http:// added when it has no scheme; SourceError if it is not http(s)."""
    full = url if "://" in url else f"http://{url}"
    parts = urlsplit(full)
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise SourceError(f"not an http(s) URL: {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SourceError(f"not an http(s) URL: {url!r}")
    return full


def metrics_endpoint(url: str) -> str:
    """'http://h:9090' -> 'http://h:9090/metrics'; a URL with a path is kept as given."""
    parts = urlsplit(http_url(url))
    path = parts.path if parts.path not in ("", "/") else "/metrics"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def scrape(client: httpx.Client, url: str) -> tuple[Exposition, float]:
    """One scrape: (parsed samples, monotonic time it was taken)."""
    try:
        response = client.get(url)
    except httpx.TimeoutException:
        raise SourceError(f"{url} did not answer within the timeout") from None
    except httpx.HTTPError as exc:
        raise SourceError(f"cannot reach {url}: {type(exc).__name__}") from None
    taken = time.monotonic()
    if response.status_code != 200:
        raise SourceError(f"{url} answered HTTP {response.status_code}")
    try:
        return parse(response.text), taken
    except ParseError as exc:
        raise SourceError(f"{url} is not a Prometheus metrics page: {exc}") from None


def _result(trigger: Trigger, instance: str, first: Exposition, second: Exposition,
            dt: float, scope: Scope) -> TriggerResult | None:
    """The trigger's row; None when an optional trigger does not apply (no series)."""
    value = compute(trigger.measure, first, second, dt, trigger.local_matchers(scope))
    if value is None and trigger.optional:
        return None
    if value is None:
        return TriggerResult(trigger, instance, State.NO_DATA, None,
                             note="metric absent: " + ", ".join(trigger.metrics))
    if math.isnan(value) and isinstance(trigger.measure, Quantile):
        return TriggerResult(trigger, instance, State.OK, None,
                             note=f"no observations in the {dt:.1f} s sample")
    state = trigger.state_for(value)
    if isinstance(trigger.measure, FederationPeers) and state is not State.OK:
        measure = trigger.measure
        return TriggerResult(
            trigger, instance, State.NO_DATA, None, current=value,
            note=f"not sustained yet: level {value:.0f} now, but a {dt:.0f} s sample cannot "
            f"show {measure.down_window} down or {measure.growth_window} of growth "
            "(use --prometheus-url)",
        )
    if trigger.sustain_s > 0 and state is not State.OK:
        return TriggerResult(
            trigger, instance, State.NO_DATA, None, current=value,
            note=f"not sustained yet: {value:.1f} now, but a {dt:.0f} s sample cannot show "
            f"{trigger.sustain_s} s (use --prometheus-url)",
        )
    note = f"over a {dt:.0f} s sample" if trigger.sustain_s > 0 else ""
    return TriggerResult(trigger, instance, state, value, current=value, note=note)


def evaluate_direct(
    metrics_url: str,
    *,
    node_metrics_url: str | None = None,
    sample_s: float = 10.0,
    timeout: float = 10.0,
    triggers: Sequence[Trigger] = TRIGGERS,
    scope: Scope = DEFAULT_SCOPE,
    sleep: Callable[[float], None] = time.sleep,
) -> Evaluation:
    """Scrape twice, `sample_s` apart (waiting with `sleep`), and evaluate `triggers`.

    Raises `SourceError` (one line) when a page cannot be fetched or parsed.
    """
    sources = {Source.QPQ: metrics_endpoint(metrics_url)}
    if node_metrics_url is not None:
        sources[Source.NODE] = metrics_endpoint(node_metrics_url)
    started = time.time()
    with httpx.Client(timeout=timeout) as client, ThreadPoolExecutor(2) as pool:
        def scrape_all() -> dict[Source, tuple[Exposition, float]]:
            futures = {src: pool.submit(scrape, client, url) for src, url in sources.items()}
            return {src: future.result() for src, future in futures.items()}

        first = scrape_all()
        sleep(sample_s)
        second = scrape_all()

    results = []
    skipped = [t.id for t in triggers if t.source not in sources]
    notes = (["host triggers need node_exporter: give --node-metrics-url (e.g. "
              "127.0.0.1:9100) or use --prometheus-url"] if skipped else [])
    for trigger in triggers:
        if trigger.source not in sources:
            continue
        instance = urlsplit(sources[trigger.source]).netloc
        (a, ta), (b, tb) = first[trigger.source], second[trigger.source]
        result = _result(trigger, instance, a, b, max(tb - ta, 1e-3), scope)
        if result is None:
            skipped.append(trigger.id)
            notes.append(f"{trigger.id}: {trigger.optional}")
        else:
            results.append(result)
    return Evaluation("direct", sources[Source.QPQ], started, tuple(results), tuple(skipped),
                      "; ".join(notes))
