"""Operations docs: every alert's runbook link lands on a section; tables carry the code's values."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from qpq_ops import capacity
from qpq_ops.metrics_catalog import METRICS
from qpq_ops.render.alerts import all_alerts
from qpq_ops.render.runbooks import RUNBOOKS
from qpq_ops.render.settings import DEFAULT_RUNBOOK_BASE_URL, runbook_url
from qpq_ops.render.tables import threshold_text
from qpq_ops.triggers import RUNBOOK_DOC, TRIGGERS, Severity

DOCS = Path("docs/operations")


def _anchors(markdown: str) -> list[str]:
    return re.findall(r'<a id="([^"]+)"></a>', markdown)


def test_every_runbook_url_in_the_alert_rules_lands_on_a_section(repo: Path) -> None:
    anchors = set(_anchors((repo / RUNBOOK_DOC).read_text()))
    doc = yaml.safe_load((repo / "prometheus/alerts/qpq-alerts.yml").read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            url = rule["annotations"]["runbook_url"]
            path, _, anchor = url.partition("#")
            # absolute, so it opens from an Alertmanager mail or a Grafana notification
            assert path == runbook_url("x").partition("#")[0], url
            assert path.startswith(DEFAULT_RUNBOOK_BASE_URL) and anchor in anchors, url


def test_incident_response_has_one_section_per_trigger_with_all_four_parts(repo: Path) -> None:
    text = (repo / RUNBOOK_DOC).read_text()
    anchors = _anchors(text)
    assert len(anchors) == len(set(anchors))
    for trigger in TRIGGERS:
        assert trigger.id in anchors
        section = text.split(f'<a id="{trigger.id}"></a>', 1)[1].split("<a id=", 1)[0]
        for part in ("**Symptom.**", "**First checks.**", "**Commands.**", "**Fix.**"):
            assert part in section, (trigger.id, part)
        for severity in Severity:
            assert threshold_text(trigger, severity) in section


def test_runbooks_and_alerts_match_one_to_one() -> None:
    used = {a.runbook_anchor for a in all_alerts()}
    written = [r.anchor for r in RUNBOOKS]
    assert len(written) == len(set(written))
    assert used == set(written)


def test_monitoring_doc_lists_every_metric_and_alert(repo: Path) -> None:
    text = (repo / DOCS / "monitoring.md").read_text()
    for spec in METRICS:
        assert f"| `{spec.name}` | {spec.type} |" in text
    for alert in all_alerts():
        assert f"`{alert.name}`" in text


def test_scaling_guide_tables_carry_the_tiers_triggers_and_sysctls(repo: Path) -> None:
    text = (repo / DOCS / "scaling-guide.md").read_text()
    for tier in capacity.TIERS:
        assert f"| {tier.name} ({tier.purpose}) | {tier.cpu} | {tier.memory} |" in text
    for trigger in TRIGGERS:
        row = next(line for line in text.splitlines()
                   if line.startswith(f"| [`{trigger.id}`]"))
        assert threshold_text(trigger, Severity.WARNING) in row
        assert threshold_text(trigger, Severity.CRITICAL) in row
    for name, value in capacity.SYSCTL.items():
        assert f"| `{name}` | {value:,} |" in text


def test_docs_links_to_sibling_documents_resolve(repo: Path) -> None:
    for path in (repo / DOCS).glob("*.md"):
        for target in re.findall(r"\]\(([a-z-]+\.md)(?:#[a-z_]+)?\)", path.read_text()):
            if target in ("monitoring.md", "incident-response.md", "scaling-guide.md"):
                assert (repo / DOCS / target).is_file(), (path.name, target)
