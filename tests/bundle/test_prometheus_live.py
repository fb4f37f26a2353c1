"""The bundle's rules on a real Prometheus scraping a real qpq server and node_exporter.

promtool tests prove the rules' logic on synthetic series; this proves they evaluate
without errors on the real exporters' series (label sets, matching) and that the
dashboard's queries all run.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from qpq_ops.backup.textfile import TEXTFILE_NAME, write_backup_metrics
from qpq_ops.render.recording_rules import trigger_record
from qpq_ops.render.selectors import NODE_JOB, QPQ_JOB
from qpq_ops.triggers import TRIGGERS
from qpq_server.devserver import NodeExporter, wait_until
from tests.helpers.prometheus import RunningPrometheus, ScrapeJob, running_prometheus
from tests.helpers.server import running_server

NODE = "node1"


def _rules(url: str) -> list[dict[str, Any]]:
    groups = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _wait_all_rules_evaluated(url: str, since: float, timeout: float = 20.0) -> list[dict[str, Any]]:
    def evaluated() -> list[dict[str, Any]]:
        rules = _rules(url)
        stamps = [r.get("lastEvaluation", "") for r in rules]
        return rules if rules and all(s and not s.startswith("0001") for s in stamps) else []

    return wait_until(evaluated, timeout, "every rule evaluated once")


@dataclass(frozen=True)
class Scraping:
    prom: RunningPrometheus
    textfiles: Path  # node_exporter's textfile dir, empty at first (no backup yet)
    started: float


@pytest.fixture(scope="module")
def scraping(repo: Path, tmp_path_factory: pytest.TempPathFactory,
             node_exporter: NodeExporter) -> Iterator[Scraping]:
    """One Prometheus with the bundle's recording and alert rules, scraping a real qpq
    server and node_exporter as one instance, before any backup wrote its metric."""
    base = tmp_path_factory.mktemp("prometheus-live")
    rule_files = [repo / "prometheus/rules/qpq-recording.yml",
                  repo / "prometheus/alerts/qpq-alerts.yml"]
    textfiles = node_exporter.textfile_dir
    assert textfiles is not None
    (textfiles / TEXTFILE_NAME).unlink(missing_ok=True)
    with running_server(base / "server") as server:
        jobs = [ScrapeJob(QPQ_JOB, [server.metrics_url.removeprefix("http://")], instance=NODE),
                ScrapeJob(NODE_JOB, [node_exporter.hostport], instance=NODE)]
        with running_prometheus(base, jobs, rule_files=rule_files) as prom:
            prom.wait_for_targets_up()
            yield Scraping(prom, textfiles, time.time())


def test_rules_and_dashboard_queries_run_on_real_exporters(repo: Path,
                                                            scraping: Scraping) -> None:
    prom = scraping.prom
    for trigger in TRIGGERS:
        if not trigger.optional:  # federation: no series while it is off
            prom.wait_for(f'{trigger_record(trigger)}{{instance="{NODE}"}}', timeout=20)

    rules = _wait_all_rules_evaluated(prom.url, scraping.started)
    unhealthy = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not unhealthy
    for trigger in TRIGGERS:
        if trigger.optional:  # evaluated without error, to nothing
            assert prom.query(trigger_record(trigger)) == []

    dashboard = json.loads((repo / "dashboards/qpq-overview.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for expr in exprs:
        query = expr.replace("$instance", NODE)
        response = httpx.get(f"{prom.url}/api/v1/query", params={"query": query}, timeout=10)
        assert response.status_code == 200, (query, response.text)
        assert response.json()["status"] == "success"
    (instances,) = [v["query"] for v in dashboard["templating"]["list"]
                    if v["name"] == "instance"]
    selector = re.fullmatch(r"label_values\((.*), instance\)", instances)
    assert selector is not None
    assert {s["metric"]["instance"] for s in prom.query(selector.group(1))} == {NODE}


def test_backup_alert_is_pending_without_a_backup_and_clears_after_one(
        scraping: Scraping) -> None:
    prom = scraping.prom
    missing = ('ALERTS{alertname="qpq_backup_stale",reason="missing",'
               f'alertstate="pending",instance="{NODE}"}}')
    prom.wait_for(missing, timeout=20)
    # The writer `qpq-ops backup create` uses, after a successful backup.
    write_backup_metrics(scraping.textfiles, time.time(), 1000, 1.0)
    prom.wait_for(missing, lambda result: not result, timeout=20)
    assert prom.query('ALERTS{alertname="qpq_backup_stale"}') == []
