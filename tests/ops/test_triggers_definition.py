"""The single trigger definition: shape, ordering checks and PromQL rendering."""

from __future__ import annotations

import dataclasses
import re
import subprocess

import pytest

from qpq_ops.triggers import (
    DEFAULT_SCOPE,
    RUNBOOK_DOC,
    TRIGGER_IDS,
    TRIGGERS,
    Direction,
    Scope,
    State,
    get_trigger,
    validate_triggers,
    worst_state,
)

DESIGN_IDS = [
    "cpu", "memory", "disk_usage", "disk_io_latency", "delivery_queue_depth",
    "rate_limit_hits", "login_failures", "connections", "tls_handshake_latency",
    "process_cpu", "federation",
]

GUIDE_THRESHOLDS = {
    "cpu": (70, 90), "memory": (75, 90), "disk_usage": (70, 90),
    "disk_io_latency": (0.005, 0.020), "delivery_queue_depth": (10_000, 100_000),
    "rate_limit_hits": (100, 1000), "login_failures": (50, 500),
    "connections": (80, 95), "tls_handshake_latency": (0.1, 0.5),
    "process_cpu": (80, 95),  # qpq's own: percent of the one core a worker can use
    "federation": (0, 1),  # levels: 1 a queue growing 15 min, 2 a peer down 5 min
}


def test_guide_triggers_then_process_cpu_in_design_order_with_thresholds() -> None:
    assert [t.id for t in TRIGGERS] == DESIGN_IDS == list(TRIGGER_IDS)
    for t in TRIGGERS:
        assert (t.warning, t.critical) == GUIDE_THRESHOLDS[t.id]
        assert t.runbook_anchor == t.id
        assert t.runbook == f"{RUNBOOK_DOC}#{t.id}"
        assert t.unit in ("percent", "seconds", "messages", "per_minute", "level")
        assert t.action and t.title and t.measures


def test_cpu_is_sustained_five_minutes_and_others_instantaneous() -> None:
    sustained = ("cpu", "process_cpu")
    assert all(get_trigger(i).sustain_s == 300 for i in sustained)
    assert all(t.sustain_s == 0 for t in TRIGGERS if t.id not in sustained)
    assert all(t.alert_for_s >= t.sustain_s for t in TRIGGERS)


def test_expressions_use_the_design_metrics() -> None:
    assert get_trigger("connections").expr == (
        '100 * sum by (instance) (qpq_connections_active{job="qpq"}) / '
        'sum by (instance) (qpq_connections_max{job="qpq"})'
    )
    assert get_trigger("process_cpu").expr == (
        '100 * max by (instance) (rate(process_cpu_seconds_total{job="qpq"}[5m]))')
    assert "qpq_db_write_duration_seconds_bucket" in get_trigger("disk_io_latency").expr
    assert "qpq_tls_handshake_duration_seconds_bucket" in get_trigger(
        "tls_handshake_latency").expr
    assert 'node_cpu_seconds_total{mode="idle",job="node"}' in get_trigger("cpu").expr


def test_every_series_selects_its_job_and_the_data_filesystem() -> None:
    scope = Scope(qpq_job="qpq-eu", node_job="hosts", mountpoint="/srv/qpq")
    expr = get_trigger("connections").expr_in(scope, '{instance="a:9090"}')
    assert expr.count('{job="qpq-eu",instance="a:9090"}') == 2
    assert 'job="hosts"' in get_trigger("cpu").expr_in(scope)
    disk = get_trigger("disk_usage").expr_in(scope)
    assert disk.count('{job="hosts",mountpoint="/srv/qpq"}') == 2
    assert get_trigger("memory").expr_in(DEFAULT_SCOPE) == get_trigger("memory").expr
    for t in TRIGGERS:  # no bare metric name anywhere: every selector has a job
        selectors = re.findall(r"\{[^}]*\}", t.expr)
        assert selectors and all(re.search(r'(^\{|,)job="', sel) for sel in selectors), t.expr


def test_rate_windows_survive_a_one_minute_scrape_interval() -> None:
    for t in TRIGGERS:
        for window in re.findall(r"\[(\d+)m\]", t.expr):
            assert int(window) * 60 >= 4 * 60, t.expr


def test_every_expression_parses_with_promtool(tmp_path) -> None:
    rules = ["groups:", "- name: t", "  rules:"]
    for t in TRIGGERS:
        for expr in (t.expr, t.expr_in(Scope("j", "n", "/d"), '{instance="x:1"}')):
            rules += [f"  - record: qpq:{t.id}", f"    expr: '{expr}'"]
    path = tmp_path / "rules.yml"
    path.write_text("\n".join(rules) + "\n")
    out = subprocess.run(["promtool", "check", "rules", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("value", "state"),
    [(None, State.NO_DATA), (float("nan"), State.NO_DATA), (10.0, State.OK),
     (70.0, State.OK), (70.1, State.WARNING), (90.0, State.WARNING), (90.5, State.CRITICAL)],
)
def test_state_for_compares_strictly_above(value: float | None, state: State) -> None:
    assert get_trigger("cpu").state_for(value) is state


def test_below_direction_inverts_comparison() -> None:
    low = dataclasses.replace(get_trigger("cpu"), direction=Direction.BELOW,
                              warning=20.0, critical=5.0)
    assert low.state_for(50.0) is State.OK
    assert low.state_for(10.0) is State.WARNING
    assert low.state_for(1.0) is State.CRITICAL


def test_swapped_thresholds_are_refused() -> None:
    swapped = dataclasses.replace(get_trigger("memory"), warning=90.0, critical=75.0)
    table = tuple(swapped if t.id == "memory" else t for t in TRIGGERS)
    with pytest.raises(ValueError, match=r"memory: critical 75\.0 is not stricter"):
        validate_triggers(table)


def test_duplicate_or_missing_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        validate_triggers((*TRIGGERS, TRIGGERS[0]))
    with pytest.raises(ValueError, match="differ from DESIGN"):
        validate_triggers(TRIGGERS[:-1])


def test_alert_for_shorter_than_sustain_is_refused() -> None:
    bad = dataclasses.replace(get_trigger("cpu"), alert_for_s=60)
    with pytest.raises(ValueError, match="cpu: need 0 <= sustain_s <= alert_for_s"):
        validate_triggers((bad, *TRIGGERS[1:]))


def test_unknown_trigger_id_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="known: cpu, memory"):
        get_trigger("disk")


def test_worst_state_orders_critical_warning_nodata_ok() -> None:
    assert worst_state([State.OK, State.NO_DATA]) is State.NO_DATA
    assert worst_state([State.NO_DATA, State.WARNING]) is State.WARNING
    assert worst_state([State.WARNING, State.CRITICAL, State.OK]) is State.CRITICAL
    assert worst_state([State.OK]) is State.OK
    assert worst_state([]) is State.NO_DATA


def test_federation_reads_both_peer_metrics_per_instance_with_their_windows() -> None:
    expr = get_trigger("federation").expr_in(DEFAULT_SCOPE, '{instance="a:9090"}')
    sel = '{job="qpq",instance="a:9090"}'
    assert f"max_over_time(qpq_federation_peer_up{sel}[5m]) == bool 0" in expr
    assert f"min_over_time(deriv(qpq_federation_queue_depth{sel}[5m])[15m:1m]) > bool 0" in expr
    # each condition needs data from before its window: no alert from a fresh Prometheus
    assert f"present_over_time(qpq_federation_peer_up{sel}[5m] offset 5m)" in expr
    assert f"present_over_time(qpq_federation_queue_depth{sel}[5m] offset 15m)" in expr
    assert expr.startswith("max by (instance) (")


def test_only_federation_is_optional_and_says_why() -> None:
    assert {t.id for t in TRIGGERS if t.optional} == {"federation"}
    assert "federation is not enabled" in get_trigger("federation").optional


def test_a_level_trigger_must_name_every_level() -> None:
    bad = dataclasses.replace(get_trigger("federation"), levels=("ok", "queue"))
    table = tuple(bad if t.id == "federation" else t for t in TRIGGERS)
    with pytest.raises(ValueError, match="name every level"):
        validate_triggers(table)
