"""check-triggers --metrics-url: two scrapes, no Prometheus (real server, real
node_exporter, and the test exporter's per-instance pages)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from typer.testing import CliRunner

from qpq_ops.cli import app
from qpq_ops.evaluate.exposition import histogram_quantile, parse
from qpq_ops.triggers import TRIGGER_IDS
from qpq_server.devserver import running_node_exporter
from tests.helpers.server import RunningServer, running_server
from tests.ops.fake_exporter import (
    CRIT,
    OK,
    WARN,
    FakeExporter,
    FakeInstance,
    Profile,
    expected_values,
    serving,
)

runner = CliRunner()


def triggers_except(*ids: str) -> list[str]:
    args: list[str] = []
    for trigger_id in TRIGGER_IDS:
        if trigger_id not in ids:
            args += ["--trigger", trigger_id]
    return args


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("direct")) as srv:
        yield srv


@pytest.fixture(scope="module")
def node_exporter() -> Iterator[str]:
    with running_node_exporter() as exporter:
        yield exporter.url


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeExporter]:
    exporter = FakeExporter([
        FakeInstance("ok", [(0, OK)]), FakeInstance("warn", [(0, WARN)]),
        FakeInstance("crit", [(0, CRIT)]),
        FakeInstance("partial", [(0, Profile(queue_depth=5))]),
    ])
    with serving(exporter):
        yield exporter


def direct(*args: str, sample: int = 1) -> tuple[int, dict]:  # type: ignore[type-arg]
    result = runner.invoke(app, ["check-triggers", "--json", "--sample", str(sample), *args])
    assert result.exit_code in (0, 1, 2, 3), result.output
    return result.exit_code, json.loads(result.stdout)


def test_real_server_and_node_exporter_in_direct_mode(server: RunningServer,
                                                      node_exporter: str) -> None:
    code, doc = direct("--metrics-url", server.metrics_url, "--node-metrics-url", node_exporter)
    rows = {t["id"]: t for t in doc["triggers"]}
    # federation is off: its trigger does not apply, said once (never a failing row)
    assert doc["skipped"]["ids"] == ["federation"]
    assert "federation is not enabled" in doc["skipped"]["reason"]
    # a sample cannot show a 5-minute window: ok when ok now, else "not sustained yet"
    for sustained in ("cpu", "process_cpu"):
        row = rows[sustained]
        if row["state"] == "no-data":
            assert "not sustained yet" in row["note"] and row["current"] > 70, row
        else:
            assert row["state"] == "ok" and row["value"] <= 80, row
    for host in ("memory", "disk_usage"):
        assert rows[host]["state"] != "no-data" and 0 < rows[host]["value"] < 100
        assert rows[host]["instance"] == node_exporter.removeprefix("http://")
    for qpq in ("delivery_queue_depth", "rate_limit_hits", "login_failures", "connections"):
        assert rows[qpq]["state"] == "ok" and rows[qpq]["value"] == 0
        assert rows[qpq]["instance"] == server.metrics_url.removeprefix("http://")
    for hist in ("disk_io_latency", "tls_handshake_latency"):
        assert rows[hist]["state"] == "ok"
    assert code == {"critical": 2, "warning": 1, "no-data": 3, "ok": 0}[doc["status"]]
    assert doc["source"] == "direct"


def test_direct_mode_without_node_exporter_exits_0_on_a_healthy_server(
        server: RunningServer) -> None:
    code, doc = direct("--metrics-url", server.metrics_url)
    rows = {t["id"]: t for t in doc["triggers"]}
    # host triggers are said once, not as failing rows
    assert doc["skipped"]["ids"] == ["cpu", "memory", "disk_usage", "federation"]
    assert "--node-metrics-url" in doc["skipped"]["reason"]
    assert "federation: federation is not enabled" in doc["skipped"]["reason"]
    assert set(rows) == set(TRIGGER_IDS) - {"cpu", "memory", "disk_usage", "federation"}
    # the qpq process's own CPU is answered from process_cpu_seconds_total
    assert rows["process_cpu"]["value"] is not None and rows["process_cpu"]["state"] == "ok"
    assert doc["status"] == "ok" and code == 0
    table = runner.invoke(app, ["check-triggers", "--sample", "1", "--metrics-url",
                                server.metrics_url], env={"COLUMNS": "100"})
    assert table.exit_code == 0
    assert table.stdout.count("--node-metrics-url") == 1


def test_direct_mode_selected_qpq_triggers_exit_0(server: RunningServer) -> None:
    code, doc = direct("--metrics-url", server.metrics_url.removeprefix("http://") + "/metrics",
                       *triggers_except("cpu", "memory", "disk_usage"))
    assert code == 0 and doc["status"] == "ok"
    assert len(doc["triggers"]) == 7


@pytest.mark.parametrize(("instance", "profile", "state", "code"), [
    ("ok", OK, "ok", 0), ("warn", WARN, "warning", 1), ("crit", CRIT, "critical", 2),
])
def test_direct_mode_turns_counters_into_rates(fake: FakeExporter, instance: str,
                                               profile: Profile, state: str,
                                               code: int) -> None:
    page = f"{fake.url}/metrics/{instance}"
    # Rates divide by the time between the two responses, which a loaded machine stretches
    # (the exporter is a thread of this process): two seconds keep that within the 5 %.
    # process_cpu and federation are no-data unless ok (below), which leaves the exit code
    # to the others: warning and critical outrank no-data.
    exit_code, doc = direct("--metrics-url", page, "--node-metrics-url", page,
                            *triggers_except("cpu"), sample=2)
    assert exit_code == code
    want = expected_values(profile)
    rows = {row["id"]: row for row in doc["triggers"]}
    # worker CPU: the busiest worker's process_cpu_seconds_total; beyond a threshold a
    # sample is not a sustained window
    row = rows.pop("process_cpu")
    if state == "ok":
        assert row["value"] == pytest.approx(want["process_cpu"], rel=0.05)
    else:
        assert row["state"] == "no-data" and "not sustained yet" in row["note"]
        assert row["current"] == pytest.approx(want["process_cpu"], rel=0.05)
    # federation: a peer down or a queue growing now is no 5- or 15-minute window either
    row = rows.pop("federation")
    if state == "ok":
        assert row["state"] == "ok" and row["value"] == 0
    else:
        assert row["state"] == "no-data" and "not sustained yet" in row["note"], row
        assert row["current"] == want["federation"]
    assert rows
    for row in rows.values():
        assert row["state"] == state, row
        assert row["value"] == pytest.approx(want[row["id"]], rel=0.05), row


def test_direct_mode_absent_metrics_are_no_data(fake: FakeExporter) -> None:
    code, doc = direct("--metrics-url", f"{fake.url}/metrics/partial")
    states = {t["id"]: t["state"] for t in doc["triggers"]}
    assert states.pop("delivery_queue_depth") == "ok"
    assert set(states.values()) == {"no-data"}
    assert code == 3


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    inf = float("inf")
    assert histogram_quantile(0.95, {0.01: 0, 0.05: 100, inf: 100}) == pytest.approx(0.048)
    assert histogram_quantile(0.5, {0.1: 50, 0.2: 100, inf: 100}) == pytest.approx(0.1)
    # rank in the +Inf bucket: the highest finite bound
    assert histogram_quantile(0.95, {0.1: 0, 0.2: 10, inf: 100}) == 0.2
    assert str(histogram_quantile(0.95, {0.1: 0, inf: 0})) == "nan"


def test_exposition_parser_reads_server_page(server: RunningServer) -> None:
    page = parse(httpx.get(server.metrics_url + "/metrics").text)
    assert page.series("qpq_connections_max")
    assert page.series("qpq_tls_handshake_duration_seconds_bucket")
