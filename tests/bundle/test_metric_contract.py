"""Every metric the bundle queries is really exported.

Scrapes a real `qpq-server` and Debian's real node_exporter, then checks the names read
by the alert rules, the recording rules, the dashboard and the triggers, and the
metrics catalogue that the docs table is made from.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from qpq_ops.metrics_catalog import (
    METRICS,
    MetricSource,
    MetricSpec,
    metric_by_name,
    sample_names,
)
from qpq_ops.triggers import TRIGGERS
from qpq_server.devserver import NodeExporter
from tests.bundle.exposition import Exposition, parse_exposition
from tests.bundle.promql_names import metric_names
from tests.helpers.server import BIN, RunningServer, running_server

_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\)$")
"""Grafana's `label_values(selector, label)`: only the selector is PromQL."""

# Series Prometheus makes itself (scrape health), not read from any target.
PROMETHEUS_SYNTHETIC = {"up"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("qpq")) as running:
        yield running


@pytest.fixture(scope="module")
def server_metrics(server: RunningServer) -> Exposition:
    return parse_exposition(httpx.get(server.metrics_url + "/metrics", timeout=10).text)


@pytest.fixture(scope="module")
def node_metrics(node_exporter: NodeExporter, server: RunningServer,
                 tmp_path_factory: pytest.TempPathFactory) -> Exposition:
    """node_exporter after a real `qpq-ops backup create` wrote its textfile metrics."""
    dest = tmp_path_factory.mktemp("backups")
    result = subprocess.run(
        [str(BIN / "qpq-ops"), "backup", "create", "--config", str(server.config_path),
         "--dest", str(dest), "--textfile-dir", str(node_exporter.textfile_dir)],
        capture_output=True, text=True, timeout=120, env=server.env,
    )
    assert result.returncode == 0, result.stderr
    return parse_exposition(httpx.get(node_exporter.url + "/metrics", timeout=10).text)


def _rule_exprs(path: Path) -> dict[str, str]:
    doc = yaml.safe_load(path.read_text())
    return {rule.get("record") or rule["alert"]: rule["expr"]
            for group in doc["groups"] for rule in group["rules"]}


def _recorded(repo: Path) -> set[str]:
    return set(_rule_exprs(repo / "prometheus/rules/qpq-recording.yml"))


def _dashboard_exprs(repo: Path) -> list[str]:
    dashboard = json.loads((repo / "dashboards/qpq-overview.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def _queried_names(repo: Path) -> dict[str, set[str]]:
    """metric name -> where it is queried (recorded series excluded: they are ours)."""
    sources: dict[str, list[str]] = {
        "recording rules": list(_rule_exprs(repo / "prometheus/rules/qpq-recording.yml").values()),
        "alert rules": list(_rule_exprs(repo / "prometheus/alerts/qpq-alerts.yml").values()),
        "dashboard": [_LABEL_VALUES.sub(r"\1", e) for e in _dashboard_exprs(repo)],
        "triggers": [t.expr for t in TRIGGERS],
    }
    recorded = _recorded(repo)
    used: dict[str, set[str]] = {}
    for where, exprs in sources.items():
        for expr in exprs:
            for name in metric_names(expr) - recorded:
                used.setdefault(name, set()).add(where)
    for trigger in TRIGGERS:
        for name in trigger.metrics:
            used.setdefault(name, set()).add("triggers")
    return used


def test_every_queried_metric_is_exported_by_qpq_or_node_exporter(
        repo: Path, server_metrics: Exposition, node_metrics: Exposition) -> None:
    used = _queried_names(repo)
    assert len(used) >= 20, sorted(used)  # the extraction found the bundle's queries
    missing = {
        name: sorted(where) for name, where in used.items()
        if name not in PROMETHEUS_SYNTHETIC
        and not server_metrics.exports(name) and not node_metrics.exports(name)
    }
    assert not missing, f"queried but exported by neither qpq-server nor node_exporter: {missing}"


def test_every_recorded_series_the_alerts_and_dashboard_read_is_recorded(repo: Path) -> None:
    recorded = _recorded(repo)
    reads = [*_rule_exprs(repo / "prometheus/alerts/qpq-alerts.yml").values(),
             *_dashboard_exprs(repo)]
    wanted = {n for e in reads for n in metric_names(e) if ":" in n}
    assert wanted, "no recorded series used at all"
    assert wanted <= recorded, sorted(wanted - recorded)


def test_server_exports_every_catalogued_metric_with_its_type(server_metrics: Exposition) -> None:
    for spec in METRICS:
        if spec.source is not MetricSource.SERVER:
            continue
        assert spec.name in server_metrics.types, f"{spec.name} not exported by qpq-server"
        assert server_metrics.types[spec.name] == str(spec.type), spec.name
        if not spec.labels:  # a labelled family has samples only once a child exists
            for sample in sample_names(spec):
                assert sample in server_metrics.samples, f"{sample} has no sample line"


_GENERIC_LABELS = {"instance", "job", "le"}


def _family(sample: str) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        if sample.endswith(suffix) and metric_by_name_or_none(sample.removesuffix(suffix)):
            return sample.removesuffix(suffix)
    return sample


def metric_by_name_or_none(name: str) -> MetricSpec | None:
    return next((m for m in METRICS if m.name == name), None)


def test_every_label_the_rules_group_or_match_by_is_a_label_of_the_metric(repo: Path) -> None:
    """`sum by (instance, op, code) (rate(qpq_rpc_errors_total[5m]))` needs op and code
    on qpq_rpc_errors_total; a renamed label would silently collapse the series."""
    checked = 0
    exprs = [*_rule_exprs(repo / "prometheus/rules/qpq-recording.yml").values(),
             *_rule_exprs(repo / "prometheus/alerts/qpq-alerts.yml").values()]
    for expr in exprs:
        grouped = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr)
                   for label in group.split(",")}
        matched = set(re.findall(r"([a-zA-Z_]+)\s*(?:=~|!~|!=|=)\s*\"", expr))
        for name in metric_names(expr):
            spec = metric_by_name_or_none(_family(name))
            if spec is None:
                continue
            for label in (grouped | matched) - _GENERIC_LABELS:
                assert label in spec.labels, f"{label} is not a label of {spec.name}: {expr}"
                checked += 1
    assert checked >= 5  # op, code, reason, peer, result at least


def test_exported_label_names_equal_the_catalogue(server_metrics: Exposition) -> None:
    seen = 0
    for spec in METRICS:
        if spec.source is not MetricSource.SERVER:
            continue
        for sample in sample_names(spec):
            for labels in server_metrics.labels.get(sample, []):
                assert set(labels) - {"le"} == set(spec.labels), (sample, labels)
                seen += 1
    assert seen  # the fresh server shows at least the label-less families and `scope`


def test_catalogue_is_the_server_registry_not_a_copy() -> None:
    from prometheus_client import CollectorRegistry

    from qpq_server.metrics import ServerMetrics

    families = {m.name for m in ServerMetrics(CollectorRegistry()).registry.collect()}
    server_specs = [m for m in METRICS if m.source is MetricSource.SERVER]
    assert {m.name.removesuffix("_total") for m in server_specs} <= families
    assert metric_by_name("qpq_rate_limit_hit_total").labels == ("scope",)


def test_catalogue_lists_every_qpq_metric_the_server_exports(server_metrics: Exposition) -> None:
    catalogued = {spec.name for spec in METRICS}
    exported = {
        name for name, kind in server_metrics.types.items()
        if name.startswith("qpq_") and not (kind == "gauge" and name.endswith("_created"))
    }
    assert exported - catalogued == set(), "add these to qpq_ops/metrics_catalog.py"


def test_node_exporter_exports_the_host_metrics_and_backup_textfile(
        node_metrics: Exposition) -> None:
    node_names = {n for t in TRIGGERS for n in t.metrics if n.startswith("node_")}
    node_names.add("node_netstat_Udp_RcvbufErrors")
    for name in sorted(node_names):
        assert node_metrics.exports(name), name
    for spec in METRICS:
        if spec.source is MetricSource.BACKUP_TEXTFILE:
            assert spec.name in node_metrics.samples, spec.name


def test_name_extraction_ignores_labels_functions_and_grafana_variables() -> None:
    expr = ('histogram_quantile(0.95, sum by (instance, le) '
            '(rate(qpq_x_bucket{instance=~"$instance",job="qpq"}[5m]))) '
            '/ on (instance) group_left max by (instance) (node_y) > 1e3')
    assert metric_names(expr) == {"qpq_x_bucket", "node_y"}
