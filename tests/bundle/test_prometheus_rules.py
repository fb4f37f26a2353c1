"""Prometheus config, rules and promtool tests: valid, covering every trigger, and able to fail."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from qpq_ops.render import alerts as alerts_module
from qpq_ops.render import rules_tests
from qpq_ops.render.alerts import all_alerts, trigger_alert_name
from qpq_ops.render.measure_series import series_for
from qpq_ops.render.recording_rules import trigger_record
from qpq_ops.render.selectors import NODE_JOB, PROMETHEUS_JOB, QPQ_JOB
from qpq_ops.render.settings import runbook_url
from qpq_ops.render.units import duration_text
from qpq_ops.triggers import TRIGGERS, Severity, Trigger, get_trigger
from tests.bundle.conftest import tool


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # generous: six agents share two cores, and the trigger tests cover two intervals
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def _rules(path: Path) -> list[dict[str, object]]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_check_config_accepts_prometheus_yml_and_its_rule_files(repo: Path) -> None:
    result = promtool("check", "config", str(repo / "prometheus/prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout + result.stderr


@pytest.mark.parametrize("name", ["rules/qpq-recording.yml", "alerts/qpq-alerts.yml"])
def test_promtool_check_rules_accepts_generated_rules(repo: Path, name: str) -> None:
    result = promtool("check", "rules", str(repo / "prometheus" / name))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules_passes(repo: Path) -> None:
    tests = sorted(str(p) for p in (repo / "prometheus/tests").glob("*.yml"))
    assert len(tests) == 3
    result = promtool("test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr


def _mutated_bundle(repo: Path, tmp_path: Path, old: str, new: str) -> list[str]:
    bundle = tmp_path / "prometheus"
    shutil.copytree(repo / "prometheus", bundle)
    alerts = bundle / "alerts/qpq-alerts.yml"
    text = alerts.read_text()
    assert old in text
    alerts.write_text(text.replace(old, new, 1))
    return sorted(str(p) for p in (bundle / "tests").glob("*.yml"))


@pytest.mark.parametrize(("old", "new", "catcher"), [
    ("instance:qpq_trigger_cpu:busy_percent_rate5m > 70",
     "instance:qpq_trigger_cpu:busy_percent_rate5m > 85", "qpq-triggers-test.yml"),
    ("instance:qpq_trigger_connections:percent > 95",
     "instance:qpq_trigger_connections:percent > 99", "qpq-triggers-test.yml"),
    ("    for: 5m\n", "    for: 1m\n", "qpq-triggers-test.yml"),
    ("severity: critical\n      trigger: memory", "severity: warning\n      trigger: memory",
     "qpq-triggers-test.yml"),
    ("time() < 1209600", "time() < 86400", "qpq-health-test.yml"),
], ids=["cpu-warning-threshold", "connections-critical-threshold", "for-window", "severity",
        "tls-expiry-window"])
def test_promtool_tests_fail_when_an_alert_rule_drifts(
        repo: Path, tmp_path: Path, old: str, new: str, catcher: str) -> None:
    """Only the test file that covers the rule runs (a failing subset fails the whole
    `promtool test rules`, in ~1/4 of the time); it fails on an alert, not a broken file."""
    (tests,) = [t for t in _mutated_bundle(repo, tmp_path, old, new) if t.endswith(catcher)]
    result = promtool("test", "rules", tests)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "FAILED:" in output and "alertname: qpq_" in output, output


@pytest.mark.parametrize("trigger", TRIGGERS, ids=lambda t: t.id)
def test_boundary_cases_catch_greater_or_equal_for_every_threshold(
        repo: Path, tmp_path: Path, trigger: Trigger) -> None:
    """At the threshold is not beyond it: `>` turned into `>=` in any one trigger alert
    makes the generated promtool tests fail (the at-threshold instances read it
    bit-exactly, at both scrape intervals)."""
    for severity in Severity:
        alert = f"{trigger_record(trigger)} {trigger.comparison(severity)}\n"
        mutated = alert.replace(" > ", " >= ")
        tests = _mutated_bundle(repo, tmp_path / str(severity), alert, mutated)
        (triggers_test,) = [Path(t) for t in tests if t.endswith("qpq-triggers-test.yml")]
        # This trigger's own generated tests must catch it (the others only cost time).
        doc = yaml.safe_load(triggers_test.read_text())
        doc["tests"] = [t for t in doc["tests"] if t["name"].startswith(f"trigger {trigger.id} ")]
        assert len(doc["tests"]) == 2, [t["name"] for t in doc["tests"]]
        own = triggers_test.with_name(f"{trigger.id}-test.yml")
        own.write_text(yaml.safe_dump(doc, sort_keys=False))
        result = promtool("test", "rules", str(own))
        assert result.returncode != 0, f"{trigger.id} {severity}: {result.stdout}"
        # ... because the mutated alert fired where it must not (not a broken file).
        output = result.stdout + result.stderr
        assert f"alertname: {trigger_alert_name(trigger, severity)}," in output, output


def test_a_foreign_job_and_a_counter_reset_are_in_the_generated_tests(repo: Path) -> None:
    text = (repo / "prometheus/tests/qpq-triggers-test.yml").read_text()
    doc = yaml.safe_load(text)
    names = [t["name"] for t in doc["tests"]]
    for trigger in TRIGGERS:
        for step in ("15s", "1m"):
            assert f"trigger {trigger.id} scraped every {step}" in names
    assert 'job="other-team"' in text
    for test in doc["tests"]:
        if not test["name"].startswith("trigger "):
            continue
        inputs = " ".join(s["series"] for s in test["input_series"])
        assert "-foreign" in inputs
        # promtool compares whole sample sets: the foreign instance must not be recorded
        expected = [e["labels"] for c in test["promql_expr_test"] for e in c["exp_samples"]]
        assert expected and not any("-foreign" in labels for labels in expected)
    reset = [s for t in doc["tests"] for s in t["input_series"]
             if 'instance="rate_limit_hits-warning"' in s["series"]]
    assert reset and all(" " in s["values"] for s in reset)  # two segments: a restart


def test_every_trigger_has_warning_and_critical_alerts_as_defined(repo: Path) -> None:
    rules = {r["alert"]: r for r in _rules(repo / "prometheus/alerts/qpq-alerts.yml")
             if "alert" in r}
    for trigger in TRIGGERS:
        for severity in Severity:
            rule = rules[trigger_alert_name(trigger, severity)]
            assert rule.get("for", "0s") == duration_text(trigger.alert_for_s)
            assert rule["expr"].endswith(trigger.comparison(severity)), rule["expr"]
            assert rule["labels"] == {"severity": str(severity), "trigger": trigger.id}
            annotations = rule["annotations"]
            assert annotations["runbook_url"] == runbook_url(trigger.id)
            assert "$value" in annotations["description"]


def test_health_alerts_cover_instance_down_udp_buffers_tls_expiry_and_backups(
        repo: Path) -> None:
    rules = _rules(repo / "prometheus/alerts/qpq-alerts.yml")
    exprs = {r["alert"]: r["expr"] for r in rules if "alert" in r}
    assert exprs["qpq_instance_down"].startswith("up{")
    assert "node_netstat_Udp_RcvbufErrors" in exprs["qpq_udp_receive_buffer_errors"]
    assert "qpq_tls_cert_expiry_timestamp_seconds" in exprs["qpq_tls_cert_expiry_warning"]
    backup = [r for r in rules if r.get("alert") == "qpq_backup_stale"]
    assert {r["labels"]["reason"] for r in backup} == {"too_old", "missing"}
    assert any("> 93600" in r["expr"] for r in backup)  # 26 hours
    assert any("unless" in r["expr"] for r in backup)  # absent metric


def test_every_alert_is_driven_through_firing_and_not_firing(repo: Path) -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in (repo / "prometheus/tests").glob("*.yml"):
        for test in yaml.safe_load(path.read_text())["tests"]:
            for check in test["alert_rule_test"]:
                (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {a.name for a in all_alerts()}
    assert names - fired == set(), "never seen firing"
    assert names - quiet == set(), "never seen quiet"


def test_each_trigger_has_a_test_group_checking_its_recorded_value(repo: Path) -> None:
    doc = yaml.safe_load((repo / "prometheus/tests/qpq-triggers-test.yml").read_text())
    groups = {t["name"]: t for t in doc["tests"]}
    for trigger in TRIGGERS:
        group = groups[f"trigger {trigger.id} scraped every 15s"]
        exprs = [c["expr"] for c in group["promql_expr_test"]]
        assert exprs == [f"round({trigger_record(trigger)}, 0.000001)"]


def test_a_trigger_of_an_unknown_measure_kind_cannot_be_rendered() -> None:
    @dataclasses.dataclass(frozen=True)
    class NewMeasure:
        metric: str = "qpq_new"

        def promql(self, extra: str = "") -> str:
            return self.metric

    trigger = dataclasses.replace(get_trigger("cpu"), id="new", measure=NewMeasure())  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError, match="no promtool input recipe"):
        series_for(trigger, "n1", 1.0)
    with pytest.raises(NotImplementedError):
        rules_tests.trigger_group(trigger)


def test_an_alert_without_a_promtool_scenario_fails_rendering(
        monkeypatch: pytest.MonkeyPatch) -> None:
    health = alerts_module.health_alerts()
    extra = dataclasses.replace(health[0], name="qpq_untested")
    monkeypatch.setattr(alerts_module, "health_alerts", lambda: (*health, extra))
    with pytest.raises(ValueError, match="qpq_untested"):
        rules_tests.render()


def test_prometheus_yml_scrapes_the_jobs_the_rules_select(repo: Path) -> None:
    config = yaml.safe_load((repo / "prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {QPQ_JOB, NODE_JOB, PROMETHEUS_JOB}
    assert jobs[QPQ_JOB].get("metrics_path", "/metrics") == "/metrics"
    for job, port in ((QPQ_JOB, "9090"), (NODE_JOB, "9100"), (PROMETHEUS_JOB, "9091")):
        for static in jobs[job]["static_configs"]:
            assert all(t.endswith(f":{port}") for t in static["targets"]), static
            assert static["labels"]["instance"], "targets carry a node-name instance label"
    qpq_instances = {s["labels"]["instance"] for s in jobs[QPQ_JOB]["static_configs"]}
    node_instances = {s["labels"]["instance"] for s in jobs[NODE_JOB]["static_configs"]}
    assert qpq_instances == node_instances  # server and host series join on instance
    assert config["rule_files"] == ["rules/*.yml", "alerts/*.yml"]
