"""Generated monitoring and deployment files, all from `qpq_ops.triggers.TRIGGERS`.

One module per artefact: `recording_rules`, `alerts`, `rules_tests` (promtool tests),
`dashboard` (Grafana JSON) and `docs` (monitoring, incident response, scaling guide).
`render(artefact)` returns the files; `write_files`/`check_files` put them under an
output root or compare them with what is there.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from qpq_ops.render import alerts, dashboard, docs, recording_rules, rules_tests
from qpq_ops.render._files import (
    HEADER,
    FileStatus,
    RenderedFile,
    check_files,
    write_files,
)

__all__ = [
    "HEADER",
    "Artefact",
    "FileStatus",
    "RenderedFile",
    "check_files",
    "render",
    "write_files",
]


class Artefact(StrEnum):
    ALERTS = "alerts"
    """Alert rules and the recording rules they compare."""
    RULES_TESTS = "rules-tests"
    DASHBOARD = "dashboard"
    DOCS = "docs"
    ALL = "all"


_RENDERERS: dict[Artefact, Callable[[], tuple[RenderedFile, ...]]] = {
    Artefact.ALERTS: lambda: (recording_rules.render(), alerts.render()),
    Artefact.RULES_TESTS: rules_tests.render,
    Artefact.DASHBOARD: lambda: (dashboard.render(),),
    Artefact.DOCS: docs.render,
}


def render(artefact: Artefact) -> tuple[RenderedFile, ...]:
    """The files of one artefact, or of all of them for `Artefact.ALL`."""
    if artefact is Artefact.ALL:
        return tuple(f for a, renderer in _RENDERERS.items() for f in renderer())
    return _RENDERERS[artefact]()
