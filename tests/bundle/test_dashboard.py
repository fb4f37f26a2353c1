"""The Grafana dashboard and its provisioning."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from qpq_ops.render.dashboard import UID
from qpq_ops.render.recording_rules import trigger_record
from qpq_ops.triggers import (
    BACKUP_MAX_AGE_S,
    TLS_EXPIRY_CRITICAL_S,
    TLS_EXPIRY_WARNING_S,
    TRIGGERS,
    get_trigger,
)


@pytest.fixture(scope="module")
def dashboard(repo: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((repo / "dashboards/qpq-overview.json").read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_has_a_stable_uid_and_title(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == UID == "qpq-overview"
    assert dashboard["title"] == "qpq overview"


def test_datasource_is_the_ds_prometheus_variable_everywhere(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    uids = re.findall(r'"uid":\s*"([^"]*)"', json.dumps(dashboard))
    assert set(uids) == {"${DS_PROMETHEUS}", UID}, "a hard-coded datasource uid slipped in"
    for panel in _panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


def test_instance_variable_filters_every_query(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    instance = variables["instance"]
    assert instance["type"] == "query" and instance["multi"] and instance["includeAll"]
    for panel in _panels(dashboard):
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])


def test_each_trigger_is_drawn_with_its_thresholds(dashboard: dict[str, Any]) -> None:
    for trigger in TRIGGERS:
        record = trigger_record(trigger)
        panels = [p for p in _panels(dashboard)
                  if any(t["expr"].startswith(record + "{") for t in p["targets"])]
        assert len(panels) >= 2, f"{trigger.id}: want a stat and a graph panel"
        for panel in panels:
            steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
            assert [s["value"] for s in steps] == [None, trigger.warning, trigger.critical]
            assert [s["color"] for s in steps] == ["green", "orange", "red"]
        graphs = [p for p in panels if p["type"] == "timeseries"]
        assert graphs, trigger.id
        for graph in graphs:
            style = graph["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"]
            assert style != "off"


def test_dashboard_has_the_rows_operators_need(dashboard: dict[str, Any]) -> None:
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    for wanted in ("Traffic", "Delivery", "Auth", "Connections", "Latency", "Storage",
                   "Rate limiting", "Host", "Blobs and key transparency"):
        assert wanted in rows
    exprs = " ".join(t["expr"] for p in _panels(dashboard) for t in p["targets"])
    for quantile in ("p50", "p95", "p99"):
        assert f"instance_op:qpq_rpc_duration_seconds:{quantile}_rate5m" in exprs
    # Handshake and commit latency: p50 and p99 beside the trigger's own p95.
    for histogram, trigger in (("qpq_tls_handshake_duration_seconds", "tls_handshake_latency"),
                               ("qpq_db_write_duration_seconds", "disk_io_latency")):
        for quantile in ("p50", "p99"):
            assert f"instance:{histogram}:{quantile}_rate5m" in exprs
        assert trigger_record(get_trigger(trigger)) in exprs


def test_dashboard_shows_red_per_op_worker_processes_and_restarts(
        dashboard: dict[str, Any]) -> None:
    exprs = " ".join(t["expr"] for p in _panels(dashboard) for t in p["targets"])
    assert "instance_op:qpq_rpc_duration_seconds_count:rate5m" in exprs  # R of RED
    for metric in ("process_resident_memory_bytes", "process_cpu_seconds_total",
                   "process_open_fds", "process_max_fds"):
        assert f'{metric}{{job="qpq"' in exprs, metric
    (restarts,) = dashboard["annotations"]["list"]
    assert "process_start_time_seconds" in restarts["expr"]


def test_certificate_and_backup_panels_carry_the_health_thresholds(
        dashboard: dict[str, Any]) -> None:
    panels = {p["title"]: p for p in _panels(dashboard)}
    steps = panels["TLS certificate expires in"]["fieldConfig"]["defaults"]["thresholds"]
    assert [s["value"] for s in steps["steps"]] == [
        None, TLS_EXPIRY_CRITICAL_S, TLS_EXPIRY_WARNING_S]
    steps = panels["Last successful backup"]["fieldConfig"]["defaults"]["thresholds"]
    assert [s["value"] for s in steps["steps"]] == [None, BACKUP_MAX_AGE_S]


def test_panel_ids_are_unique_and_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {panel['title']} overlaps another"
        cells |= mine


def test_provisioning_points_grafana_at_the_dashboards_and_prometheus(repo: Path) -> None:
    datasources = yaml.safe_load(
        (repo / "grafana-provisioning/datasources/prometheus.yml").read_text())
    (prom,) = datasources["datasources"]
    assert prom["type"] == "prometheus" and prom["isDefault"] is True
    assert prom["url"] == "http://prometheus:9091"
    providers = yaml.safe_load((repo / "grafana-provisioning/dashboards/qpq.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((repo / "docker-compose.prod.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana-provisioning:/etc/grafana/provisioning:ro" in mounts


def test_committed_dashboard_decodes_with_grafanas_own_models(repo: Path) -> None:
    """The JSON round-trips through grafana-foundation-sdk's typed Dashboard model."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard as DashboardModel

    register_default_plugins()
    original = json.loads((repo / "dashboards/qpq-overview.json").read_text())
    decoded = DashboardModel.from_json(original)
    again = json.loads(JSONEncoder(sort_keys=True).encode(decoded))
    assert again == original
