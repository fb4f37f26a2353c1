"""Deployment-specific choices made at render time: scrape jobs, data filesystem, links.

`qpq-ops render --qpq-job J --node-job J --data-mountpoint M --runbook-base-url URL`
sets them for one run; the committed bundle is rendered with the defaults. Renderers read
`current()` instead of taking a parameter each, so that the many small functions that
build one file stay short; `configured(settings)` scopes a choice to one render.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from qpq_ops.triggers import DEFAULT_SCOPE, RUNBOOK_DOC, Scope

__all__ = [
    "DEFAULT_RUNBOOK_BASE_URL",
    "DEFAULT_SETTINGS",
    "RenderSettings",
    "configured",
    "current",
    "runbook_url",
]

DEFAULT_RUNBOOK_BASE_URL = "http://localhost:3000/public/qpq-docs"
"""Where the compose bundle's Grafana serves `docs/` (absolute, so that a link in an
Alertmanager mail or a Grafana notification opens); set your own with
`--runbook-base-url` (e.g. your repository's https://.../blob/main)."""


@dataclass(frozen=True)
class RenderSettings:
    scope: Scope = field(default_factory=lambda: DEFAULT_SCOPE)
    runbook_base_url: str = DEFAULT_RUNBOOK_BASE_URL

    def __post_init__(self) -> None:
        parts = urlsplit(self.runbook_base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"runbook base URL must be absolute http(s), got "
                             f"{self.runbook_base_url!r}")
        if not self.scope.mountpoint.startswith("/"):
            raise ValueError(f"data mountpoint must be an absolute path, got "
                             f"{self.scope.mountpoint!r}")
        for name in (self.scope.qpq_job, self.scope.node_job):
            if not name or '"' in name or "\\" in name:
                raise ValueError(f"bad scrape job name {name!r}")


DEFAULT_SETTINGS = RenderSettings()
_CURRENT: ContextVar[RenderSettings] = ContextVar("qpq_render_settings",
                                                  default=DEFAULT_SETTINGS)


def current() -> RenderSettings:
    return _CURRENT.get()


@contextmanager
def configured(settings: RenderSettings) -> Iterator[RenderSettings]:
    token = _CURRENT.set(settings)
    try:
        yield settings
    finally:
        _CURRENT.reset(token)


def runbook_url(anchor: str, doc: str = RUNBOOK_DOC) -> str:
    """Absolute link to a runbook section, e.g. <base>/operations/incident-response.md#cpu."""
    base = current().runbook_base_url.rstrip("/")
    return f"{base}/{doc.removeprefix('docs/')}#{anchor}"
