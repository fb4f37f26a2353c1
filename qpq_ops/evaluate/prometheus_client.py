"""A small typed wrapper over `prometheus-api-client`: instant queries and targets.

Every failure (unreachable, timeout, 4xx/5xx, malformed JSON, an unexpected shape) is
translated at this boundary into one `SourceError` with a one-line message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from qpq_ops.errors import SourceError

__all__ = ["PromSample", "PromTarget", "PrometheusQuerier"]


@dataclass(frozen=True)
class PromSample:
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class PromTarget:
    """One active scrape target."""

    scrape_url: str
    job: str
    instance: str
    health: str
    """"up", "down" or "unknown\""""
    last_error: str


_STATUS = re.compile(r"HTTP Status Code (\d+)")


class PrometheusQuerier:
    """Instant queries against one Prometheus, each bounded by `timeout` seconds."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        # No retries: the caller has one deadline for everything and reports failure once.
        # The socket timeout is a little longer than that deadline so a slow answer is
        # reported by the deadline, not as the connection error urllib3 makes of a read
        # timeout once its (zero) retries are used up.
        self._prom = PrometheusConnect(
            url=self.url, retry=Retry(total=0, raise_on_status=False), timeout=timeout + 0.5
        )

    def close(self) -> None:
        self._prom.close()

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except PrometheusApiClientException as exc:
            status = _STATUS.search(str(exc))
            code = status.group(1) if status else "error"
            raise SourceError(f"Prometheus at {self.url} answered HTTP {code}") from None
        except requests.JSONDecodeError:
            raise SourceError(f"Prometheus at {self.url} answered with malformed JSON") from None
        except requests.Timeout:
            raise SourceError(
                f"Prometheus at {self.url} did not answer within {self.timeout:g} s"
            ) from None
        except requests.ConnectionError as exc:
            if "timed out" in str(exc):
                raise SourceError(
                    f"Prometheus at {self.url} did not answer within {self.timeout:g} s"
                ) from None
            raise SourceError(f"cannot reach Prometheus at {self.url}") from None
        except requests.RequestException as exc:
            raise SourceError(f"request to Prometheus at {self.url} failed: {exc}") from None
        except (ValueError, KeyError, TypeError):
            raise SourceError(f"Prometheus at {self.url} answered with malformed JSON") from None

    def query(self, expr: str, at: float | None = None) -> list[PromSample]:
        params = {} if at is None else {"time": f"{at:.3f}"}
        with self._translated():
            raw: object = self._prom.custom_query(expr, params=params)
        return _parse_vector(raw, self.url)

    def targets(self) -> list[PromTarget]:
        with self._translated():
            raw: object = self._prom.get_targets(state="active")
        bad = SourceError(f"Prometheus at {self.url} answered with an unexpected target list")
        active = raw.get("activeTargets") if isinstance(raw, dict) else None
        if not isinstance(active, list):
            raise bad
        targets = []
        for item in active:
            if not isinstance(item, dict) or not isinstance(item.get("labels"), dict):
                raise bad
            labels = item["labels"]
            targets.append(PromTarget(
                scrape_url=str(item.get("scrapeUrl", "")), job=str(labels.get("job", "")),
                instance=str(labels.get("instance", "")), health=str(item.get("health", "")),
                last_error=str(item.get("lastError", "")),
            ))
        return targets


def _parse_vector(raw: object, url: str) -> list[PromSample]:
    bad = SourceError(f"Prometheus at {url} answered with an unexpected result shape")
    if not isinstance(raw, list):
        raise bad
    samples: list[PromSample] = []
    for item in raw:
        if not isinstance(item, dict):
            raise bad
        metric, value = item.get("metric"), item.get("value")
        if not isinstance(metric, dict) or not isinstance(value, list) or len(value) != 2:
            raise bad
        try:
            number = float(value[1])
        except (TypeError, ValueError):
            raise bad from None
        samples.append(PromSample({str(k): str(v) for k, v in metric.items()}, number))
    return samples
