"""check-triggers against a real Prometheus scraping a real qpq server, a real
node_exporter and a test exporter that serves chosen values for fake instances.

Fifteen minutes of the test exporter's history are backfilled with promtool before
Prometheus starts, so the production 5-minute sustain window is evaluated for real
without waiting for it. The fake instances live in their own jobs (`JOB_ARGS` selects
them); the real server and node_exporter are jobs qpq and node as `realhost`, beside a
dead target `deadhost` in both jobs and the same node_exporter scraped as another
team's job (`foreign`), which must never show up.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qpq_ops.cli import app
from qpq_ops.evaluate.prometheus import evaluate_prometheus
from qpq_ops.triggers import TRIGGER_IDS, Scope, State, get_trigger
from qpq_server.devserver import free_port, running_node_exporter
from tests.helpers.prometheus import RunningPrometheus, ScrapeJob, running_prometheus
from tests.helpers.server import RunningServer, running_server
from tests.ops.fake_exporter import (
    CRIT,
    JOB_ARGS,
    NODE_JOB,
    OK,
    QPQ_JOB,
    WARN,
    FakeExporter,
    FakeInstance,
    Profile,
    expected_values,
    serving,
)

runner = CliRunner()
FAKE_SCOPE = Scope(QPQ_JOB, NODE_JOB)

@dataclass
class Stack:
    prom: RunningPrometheus
    exporter: FakeExporter
    server: RunningServer
    started: float


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("prom-stack")
    now = time.time()
    # the 5m sustain window of 5m rates reaches 10 minutes back; federation's growth
    # window needs a sample from before its 15 minutes
    t0 = now - 1200
    exporter = FakeExporter([
        FakeInstance("ok", [(t0, OK)]),
        FakeInstance("warn", [(t0, WARN)]),
        FakeInstance("crit", [(t0, CRIT)]),
        FakeInstance("partial", [(t0, Profile(queue_depth=5, conn_active=1, conn_max=100))]),
        # CPU at 95 % only for the last two minutes: not sustained for five.
        FakeInstance("late", [(t0, None), (now - 120, Profile(cpu_busy=95))]),
        # CPU and queue critical all along except a dip 510-360 s ago (queue: 110-80 s
        # ago, longer than the 15 s subquery step). CPU is a 5-minute rate, so the dip
        # shows in the rates of the whole sustain window but not in the current one.
        FakeInstance("dip", [
            (t0, Profile(cpu_busy=95, queue_depth=200_000)),
            (now - 510, Profile(cpu_busy=10, queue_depth=200_000)),
            (now - 360, Profile(cpu_busy=95, queue_depth=200_000)),
            (now - 110, Profile(cpu_busy=95, queue_depth=0)),
            (now - 80, Profile(cpu_busy=95, queue_depth=200_000)),
        ]),
    ])
    with serving(exporter), running_server(tmp) as server, running_node_exporter() as node:
        dead = f"127.0.0.1:{free_port()}"  # nothing listens there
        jobs = [
            ScrapeJob("fake", [exporter.hostport], honor_labels=True),
            ScrapeJob("qpq", [server.metrics_url.removeprefix("http://")],
                      instance="realhost"),
            ScrapeJob("node", [node.hostport], instance="realhost"),
            ScrapeJob("other-team-node", [node.hostport], instance="foreign"),
        ]
        dead_targets = [{"job_name": f"dead-{job}", "static_configs": [{"targets": [dead]}],
                         "relabel_configs": [
                             {"target_label": "instance", "replacement": "deadhost"},
                             {"target_label": "job", "replacement": job}]}
                        for job in ("qpq", "node")]
        history = exporter.history(t0, now, 2.0)
        with running_prometheus(tmp, jobs, scrape_configs=dead_targets,
                                history=history) as prom:
            prom.wait_for('up{instance="deadhost"} == 0', lambda r: len(r) == 2)
            prom.wait_for('up{instance=~"realhost|foreign"} == 1', lambda r: len(r) == 3)
            # rate() needs two samples of the real targets
            for metric in ("qpq_connections_max", "node_memory_MemTotal_bytes"):
                prom.wait_for(f'count_over_time({metric}{{instance="realhost"}}[1m]) >= 3')
            yield Stack(prom, exporter, server, now)


def trig_sustained(trigger_id: str) -> bool:
    return get_trigger(trigger_id).sustain_s > 0


def check_real(stack: Stack, *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    """check-triggers with the default jobs (qpq, node)."""
    result = runner.invoke(app, ["check-triggers", "--prometheus-url", stack.prom.url,
                                 "--json", *args])
    assert result.exit_code in (0, 1, 2, 3), result.output
    return result.exit_code, json.loads(result.stdout)


def check(stack: Stack, *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    """check-triggers on the fake instances' jobs."""
    return check_real(stack, *JOB_ARGS, *args)


@pytest.mark.parametrize(("instance", "profile", "state", "code"), [
    ("ok", OK, "ok", 0), ("warn", WARN, "warning", 1), ("crit", CRIT, "critical", 2),
])
def test_each_trigger_reaches_its_state_with_the_expected_value(
    stack: Stack, instance: str, profile: Profile, state: str, code: int,
) -> None:
    exit_code, doc = check(stack, "--instance", instance)
    assert exit_code == code
    assert doc["status"] == state
    assert [t["id"] for t in doc["triggers"]] == list(TRIGGER_IDS)
    want = expected_values(profile)
    for row in doc["triggers"]:
        assert row["instance"] == instance
        assert row["state"] == state, row
        # a sustained trigger reports the least bad 5-minute rate of its window: the
        # minimum of noisy rates (scrapes on a loaded machine jitter) reads a little low
        tolerance = 0.06 if trig_sustained(row["id"]) else 0.03
        assert row["value"] == pytest.approx(want[row["id"]], rel=tolerance), row
        trig = get_trigger(row["id"])
        assert (row["warning"], row["critical"], row["unit"], row["action"]) == (
            trig.warning, trig.critical, trig.unit, trig.action)


def test_instance_without_series_is_no_data_and_exits_3(stack: Stack) -> None:
    exit_code, doc = check(stack, "--instance", "nowhere:9090")
    assert exit_code == 3
    assert doc["status"] == "no-data"
    assert {t["state"] for t in doc["triggers"]} == {"no-data"}
    assert all(t["value"] is None for t in doc["triggers"])


def test_absent_metrics_are_no_data_never_ok(stack: Stack) -> None:
    exit_code, doc = check(stack, "--instance", "partial")
    states = {t["id"]: t["state"] for t in doc["triggers"]}
    assert states["delivery_queue_depth"] == "ok"
    assert states["connections"] == "ok"
    for absent in ("cpu", "memory", "disk_usage", "disk_io_latency", "rate_limit_hits",
                   "login_failures", "tls_handshake_latency", "process_cpu"):
        assert states[absent] == "no-data"
    assert exit_code == 3


def test_federation_without_its_series_is_skipped_not_no_data_nor_ok(stack: Stack) -> None:
    # "partial" and the real server export no federation series: federation is off there
    for doc in (check(stack, "--instance", "partial")[1],
                check_real(stack, "--instance", "realhost")[1]):
        assert "federation" not in {t["id"] for t in doc["triggers"]}
        assert doc["skipped"]["ids"] == ["federation"]
        assert "federation is not enabled" in doc["skipped"]["reason"]
    # where some instance federates, only that instance gets a row
    code, doc = check(stack, "--trigger", "federation")
    rows = {t["instance"]: t["state"] for t in doc["triggers"]}
    assert rows == {"ok": "ok", "warn": "warning", "crit": "critical"}
    assert doc["skipped"]["ids"] == [] and code == 2


def test_several_instances_are_evaluated_separately(stack: Stack) -> None:
    exit_code, doc = check(stack, "--instance", "ok", "--instance", "crit",
                           "--instance", "nowhere", "--trigger", "connections")
    rows = {t["instance"]: t["state"] for t in doc["triggers"]}
    assert rows == {"ok": "ok", "crit": "critical", "nowhere": "no-data"}
    assert exit_code == 2


def test_without_selector_every_instance_gets_a_row(stack: Stack) -> None:
    exit_code, doc = check(stack, "--trigger", "delivery_queue_depth")
    rows = {t["instance"]: t["state"] for t in doc["triggers"]}
    assert rows == {"ok": "ok", "warn": "warning", "crit": "critical", "partial": "ok",
                    "dip": "critical"}
    assert exit_code == 2


def test_cpu_sustained_over_the_production_window(stack: Stack) -> None:
    _, doc = check(stack, "--trigger", "cpu")
    rows = {t["instance"]: t for t in doc["triggers"]}
    assert rows["crit"]["state"] == "critical"
    assert rows["warn"]["state"] == "warning"
    # 95 % for two minutes only (no data before): not sustained yet, which is not ok.
    assert rows["late"]["state"] == "no-data"
    assert rows["late"]["value"] is None
    assert rows["late"]["current"] == pytest.approx(95, abs=3)
    assert "not sustained yet" in rows["late"]["note"]
    # 95 % now, but it dipped to 10 % within the window: not sustained either.
    assert rows["dip"]["state"] == "ok"
    assert rows["dip"]["current"] == pytest.approx(95, abs=1)
    assert rows["dip"]["value"] < 70


def test_sustain_scale_compresses_the_window_for_tests(stack: Stack) -> None:
    # A 30 s window: the late instance has held 95 % for longer, the dip is older.
    _, doc = check(stack, "--trigger", "cpu", "--instance", "late", "--instance", "dip",
                   "--sustain-scale", "0.1")
    assert {t["instance"]: t["state"] for t in doc["triggers"]} == {
        "late": "critical", "dip": "critical"}


def test_sustained_gauge_needs_the_whole_window(stack: Stack) -> None:
    sustained_queue = dataclasses.replace(get_trigger("delivery_queue_depth"),
                                          sustain_s=300, alert_for_s=300)
    full = evaluate_prometheus(stack.prom.url, triggers=[sustained_queue],
                               instances=["dip", "crit"], scope=FAKE_SCOPE)
    states = {r.instance: r.state for r in full.results}
    assert states == {"dip": State.OK, "crit": State.CRITICAL}
    dip = next(r for r in full.results if r.instance == "dip")
    assert dip.value == 0 and dip.current == 200_000
    # with a 30 s window the dip (80-110 s ago) is outside it
    short = evaluate_prometheus(stack.prom.url, triggers=[sustained_queue],
                                instances=["dip"], sustain_scale=0.1, scope=FAKE_SCOPE)
    assert short.results[0].state is State.CRITICAL


def test_real_server_and_node_exporter_relabelled_to_one_instance(stack: Stack) -> None:
    exit_code, doc = check_real(stack, "--instance", "realhost")
    rows = {t["id"]: t for t in doc["triggers"]}
    for qpq_trigger in ("disk_io_latency", "delivery_queue_depth", "rate_limit_hits",
                        "login_failures", "connections", "tls_handshake_latency"):
        assert rows[qpq_trigger]["state"] == "ok", rows[qpq_trigger]
    assert rows["connections"]["value"] == 0
    assert rows["delivery_queue_depth"]["value"] == 0
    # Prometheus has seen the real host for seconds: a busy CPU is not sustained yet
    # (no-data), an idle one is ok; never a silent pass either way.
    for sustained in ("cpu", "process_cpu"):
        row = rows[sustained]
        assert row["state"] in ("ok", "no-data"), row
        if row["state"] == "no-data":
            assert "not sustained yet" in row["note"], row
        else:
            assert row["value"] < 80, row
    for host_trigger in ("memory", "disk_usage"):
        assert rows[host_trigger]["state"] != "no-data"
        assert 0 < rows[host_trigger]["value"] < 100
    states = {row["state"] for row in rows.values()}
    assert exit_code == (2 if "critical" in states else 1 if "warning" in states
                         else 3 if "no-data" in states else 0)


def test_every_target_of_the_jobs_gets_a_row_and_a_down_one_is_never_ok(
        stack: Stack) -> None:
    exit_code, doc = check_real(stack, "--trigger", "connections", "--trigger", "memory")
    rows = {(t["id"], t["instance"]): t for t in doc["triggers"]}
    assert set(rows) == {("connections", "realhost"), ("connections", "deadhost"),
                         ("memory", "realhost"), ("memory", "deadhost")}
    assert rows["connections", "realhost"]["state"] == "ok"
    for trigger_id in ("connections", "memory"):
        dead = rows[trigger_id, "deadhost"]
        assert dead["state"] == "no-data" and "target down" in dead["note"], dead
    assert doc["status"] == "no-data" and exit_code == 3


def test_a_foreign_job_never_appears(stack: Stack) -> None:
    _, doc = check_real(stack)
    assert "foreign" not in {t["instance"] for t in doc["triggers"]}
    _, doc = check_real(stack, "--instance", "foreign")
    assert {t["state"] for t in doc["triggers"]} == {"no-data"}


def test_job_selects_the_qpq_series_and_node_job_the_host_series(stack: Stack) -> None:
    _, doc = check_real(stack, "--job", "qpq", "--trigger", "connections",
                        "--instance", "realhost")
    assert [(t["instance"], t["state"]) for t in doc["triggers"]] == [("realhost", "ok")]
    # --job moves only the qpq triggers: memory still reads the node job
    _, doc = check_real(stack, "--job", QPQ_JOB, "--trigger", "memory",
                        "--trigger", "connections")
    rows = {(t["id"], t["instance"]): t["state"] for t in doc["triggers"]}
    assert rows["memory", "realhost"] != "no-data"
    assert ("connections", "crit") in rows and ("memory", "crit") not in rows
    _, doc = check_real(stack, "--node-job", "other-team-node", "--trigger", "memory")
    assert {t["instance"] for t in doc["triggers"]} == {"foreign"}


def test_table_output_names_triggers_states_and_actions(stack: Stack) -> None:
    result = runner.invoke(app, ["check-triggers", "--prometheus-url", stack.prom.url,
                                 *JOB_ARGS, "--instance", "crit"], env={"COLUMNS": "250"})
    assert result.exit_code == 2
    for text in ("CPU usage", "critical", "95.0 %", "200,000", "1,000.0/min",
                 "Scale horizontally", "2,425.0 ms", "tighten [rate_limit]"):
        assert text in result.stdout, text


def test_table_stays_readable_at_80_columns(stack: Stack) -> None:
    result = runner.invoke(app, ["check-triggers", "--prometheus-url", stack.prom.url,
                                 *JOB_ARGS, "--instance", "crit"], env={"COLUMNS": "80"})
    assert result.exit_code == 2
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    # whole words in the cells, the actions listed below the table, markup kept as text
    for text in ("CPU usage", "Connections vs cap", "critical", "95.0 %",
                 "[rate_limit]"):
        assert text in result.stdout, text


def test_environment_variable_gives_the_prometheus_url(stack: Stack) -> None:
    result = runner.invoke(app, ["check-triggers", "--json", *JOB_ARGS, "--instance", "warn"],
                           env={"QPQ_PROMETHEUS_URL": stack.prom.url})
    assert result.exit_code == 1
    assert json.loads(result.stdout)["status"] == "warning"


def test_watch_re_evaluates_and_prints_one_json_line_per_pass(stack: Stack) -> None:
    result = runner.invoke(app, ["check-triggers", "--prometheus-url", stack.prom.url,
                                 *JOB_ARGS, "--instance", "warn", "--json", "--watch", "0.2",
                                 "--count", "3"])
    assert result.exit_code == 1
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(docs) == 3
    assert all(d["status"] == "warning" for d in docs)
    assert docs[0]["evaluated_at"] < docs[2]["evaluated_at"]


def test_watch_table_mode_exits_with_last_status(stack: Stack) -> None:
    result = runner.invoke(app, ["check-triggers", "--prometheus-url", stack.prom.url,
                                 *JOB_ARGS, "--instance", "ok", "--watch", "0.1",
                                 "--count", "2"])
    assert result.exit_code == 0
    assert "Scaling triggers" in result.stdout


def test_capacity_plan_from_prometheus_uses_observed_load(stack: Stack) -> None:
    result = runner.invoke(app, ["capacity", "plan", "--from-prometheus", stack.prom.url,
                                 "--lookback", "5m", "--avg-msg-bytes", "1000",
                                 "--blob-uploads-per-day", "0", "--avg-blob-mb", "0",
                                 "--retention-days", "30", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    peak = 10 + 850 + 990 + 1  # ok + warn + crit + partial (+ the idle real server)
    assert doc["inputs"]["users"] == peak
    per_hour = (2 + 3 + 5) * 3600
    assert doc["inputs"]["msgs_per_user_hour"] == pytest.approx(per_hour / peak, rel=0.03)
    assert doc["input_sources"]["users"] == "prometheus"
    assert doc["storage_per_day_bytes"] == pytest.approx(per_hour * 24 * 1000, rel=0.03)


def test_capacity_from_prometheus_without_qpq_metrics_exits_3(stack: Stack,
                                                             tmp_path: Path) -> None:
    with running_prometheus(tmp_path) as empty:
        result = runner.invoke(app, ["capacity", "plan", "--from-prometheus", empty.url,
                                     "--avg-msg-bytes", "1000", "--blob-uploads-per-day",
                                     "0", "--avg-blob-mb", "0", "--retention-days", "30"])
    assert result.exit_code == 3
    assert "no qpq_connections_active" in result.stderr
