"""A small typed wrapper over `prometheus-api-client` for instant queries.

Every failure (unreachable, timeout, 4xx/5xx, malformed JSON, an unexpected shape) is
translated at this boundary into one `SourceError` with a one-line message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

__all__ = ["PromSample", "PrometheusQuerier", "SourceError"]


class SourceError(Exception):
    """The metrics source could not be read; the message is one line for the operator."""


@dataclass(frozen=True)
class PromSample:
    labels: Mapping[str, str]
    value: float


_STATUS = re.compile(r"HTTP Status Code (\d+)")


class PrometheusQuerier:
    """Instant queries against one Prometheus, each bounded by `timeout` seconds."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        # No retries: the caller has one deadline for everything and reports failure once.
        self._prom = PrometheusConnect(
            url=self.url, retry=Retry(total=0, raise_on_status=False), timeout=timeout
        )

    def close(self) -> None:
        self._prom.close()

    def query(self, expr: str, at: float | None = None) -> list[PromSample]:
        params = {} if at is None else {"time": f"{at:.3f}"}
        try:
            raw: object = self._prom.custom_query(expr, params=params)
        except PrometheusApiClientException as exc:
            status = _STATUS.search(str(exc))
            code = status.group(1) if status else "error"
            raise SourceError(
                f"Prometheus at {self.url} answered HTTP {code} to a query"
            ) from None
        except requests.JSONDecodeError:
            raise SourceError(
                f"Prometheus at {self.url} answered with malformed JSON"
            ) from None
        except requests.Timeout:
            raise SourceError(
                f"Prometheus at {self.url} did not answer within {self.timeout:g} s"
            ) from None
        except requests.ConnectionError:
            raise SourceError(f"cannot reach Prometheus at {self.url}") from None
        except requests.RequestException as exc:
            raise SourceError(f"request to Prometheus at {self.url} failed: {exc}") from None
        except (ValueError, KeyError, TypeError):
            raise SourceError(
                f"Prometheus at {self.url} answered with malformed JSON"
            ) from None
        return _parse_vector(raw, self.url)


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

