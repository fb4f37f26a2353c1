"""`qpq-ops report` from a real Prometheus with 14 days of written trends, opened in a
real headless chromium: every chart drawn, threshold lines present, no script errors, no
network, readable in light and dark."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qpq_ops.cli import app
from tests.helpers.browser import Page, headless_chromium
from tests.helpers.ports import free_port
from tests.helpers.prometheus import RunningPrometheus, running_prometheus
from tests.ops import synthetic_history as synth

runner = CliRunner()
INSTANCES = sorted(synth.SHAPES)
TRIGGER_CHARTS = 4  # disk, memory, connections, delivery queue: each with two lines
# and the message rate, and blob storage where the instance exports it (not `young`)
CHARTS = sum(TRIGGER_CHARTS + 1 + (shape.blob_gb is not None) for shape in synth.SHAPES.values())


@dataclass
class Written:
    prom: RunningPrometheus
    path: Path
    doc: dict  # type: ignore[type-arg]
    html: str


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Written]:
    tmp = tmp_path_factory.mktemp("report")
    now = float(int(time.time()))
    with running_prometheus(tmp, history=synth.history(now), retention="60d",
                            max_block_duration="400h") as prom:
        prom.wait_for("count(qpq_connections_active)",
                      lambda r: bool(r) and r[0]["value"][1] == "3")
        path = tmp / "report.html"
        calibration = synth.calibration_needing_a_second_worker_above(tmp, 500)
        result = runner.invoke(app, ["report", "--prometheus-url", prom.url, "--out",
                                     str(path), "--json", "--calibration", str(calibration)])
        assert result.exit_code == 0, result.output
        yield Written(prom, path, json.loads(result.stdout), path.read_text())


@pytest.fixture(scope="module")
def page(written: Written, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    with headless_chromium(tmp_path_factory.mktemp("chromium")) as browser:
        browser.open(written.path.as_uri())
        yield browser


def test_report_summary_counts_every_instance_and_chart(written: Written) -> None:
    assert written.doc["instances"] == INSTANCES
    assert written.doc["charts"] == CHARTS
    assert written.doc["threshold_lines"] == len(INSTANCES) * TRIGGER_CHARTS * 2
    assert written.doc["status"] == "critical"


def test_report_is_self_contained(written: Written) -> None:
    lowered = written.html.lower()
    assert "<script" not in lowered
    for needle in ('src="http', "src='http", "url(http", '<link rel="stylesheet"', "@import"):
        assert needle not in lowered


def test_every_chart_renders_in_chromium_without_errors(written: Written, page: Page,
                                                         tmp_path: Path) -> None:
    charts = page.evaluate("""[...document.querySelectorAll('figure.chart svg')].map(s => {
        const r = s.getBoundingClientRect();
        return {id: s.dataset.chart, w: r.width, h: r.height,
                paths: s.querySelectorAll('path').length,
                texts: s.querySelectorAll('text').length};
    })""")
    assert len(charts) == CHARTS
    for chart in charts:
        assert chart["w"] > 300 and chart["h"] > 100, chart
        assert chart["paths"] > 10 and chart["texts"] > 5, chart
    # Every trigger chart has its warning and critical line, drawn across the plot.
    for severity in ("warning", "critical"):
        lines = page.evaluate(f"""[...document.querySelectorAll(
            'figure.chart [id$="-threshold-{severity}"] path')].map(p => p.getBBox().width)""")
        assert len(lines) == len(INSTANCES) * TRIGGER_CHARTS
        assert all(width > 200 for width in lines), lines
    png = page.screenshot()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 50_000
    (tmp_path / "report.png").write_bytes(png)
    assert page.errors == []
    # Nothing but the file itself (and inline data) was requested.
    assert [u for u in page.requests if not u.startswith(("file:", "data:"))] == []


def _luminance(css_colour: str) -> float:
    r, g, b = (int(x) for x in css_colour[css_colour.index("(") + 1:-1].split(",")[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


@pytest.mark.parametrize(("scheme", "dark_background"), [("light", False), ("dark", True)])
def test_text_and_axes_follow_the_colour_scheme(page: Page, scheme: str,
                                                dark_background: bool) -> None:
    page.set_color_scheme(scheme)
    colours = page.evaluate("""(() => {
        const text = document.querySelector('figure.chart svg text');
        const card = document.querySelector('figure.chart');
        return {body: getComputedStyle(document.body).backgroundColor,
                card: getComputedStyle(card).backgroundColor,
                chartText: getComputedStyle(text).fill,
                pageText: getComputedStyle(document.body).color};
    })()""")
    assert (_luminance(colours["body"]) < 0.5) is dark_background, colours
    assert (_luminance(colours["card"]) < 0.5) is dark_background, colours
    # Chart labels are drawn in the page's text colour: strong contrast either way.
    assert colours["chartText"] == colours["pageText"], colours
    assert abs(_luminance(colours["chartText"]) - _luminance(colours["card"])) > 0.6, colours


def test_report_shows_dates_capacity_alerts_and_doctor_hint(written: Written, page: Page) -> None:
    text = page.evaluate("document.body.innerText")
    assert "not within the horizon" in text
    assert "too little history" in text
    assert "QpqDiskUsageWarning" in text
    assert "2 worker(s) on 1 host(s) from" in text
    assert "pass --config PATH" in text
    for unit in ("%", "messages waiting", "messages per minute", "date (UTC)"):
        assert page.evaluate(
            f"[...document.querySelectorAll('figure.chart svg text')]"
            f".some(t => t.textContent.includes({json.dumps(unit)}))"), unit


def test_unreachable_prometheus_exits_3_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["report", "--prometheus-url", url, "--out", str(out),
                                 "--timeout", "5"])
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines() == [
        f"qpq-ops: error: cannot reach Prometheus at {url}"]
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--lookback", "2 weeks"], "--lookback: '2 weeks' is not a duration"),
    ([], "--out FILE is required"),
    (["--out", "/nonexistent-dir/report.html"], "--out: directory /nonexistent-dir does not exist"),
])
def test_report_bad_options_exit_64(tmp_path: Path, args: list[str], message: str) -> None:
    if "--out" not in args and args:
        args = [*args, "--out", str(tmp_path / "r.html")]
    result = runner.invoke(app, ["report", "--prometheus-url", "http://127.0.0.1:9", *args])
    assert result.exit_code == 64
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_with_config_the_doctor_findings_are_in_the_report(written: Written,
                                                           tmp_path: Path) -> None:
    import subprocess
    import sys

    from qpq_ops.doctor import CHECKS

    data = tmp_path / "data"
    subprocess.run([str(Path(sys.executable).parent / "qpq-server"), "init", "--data-dir",
                    str(data)], check=True, capture_output=True, timeout=60)
    out = tmp_path / "with-doctor.html"
    result = runner.invoke(app, ["report", "--prometheus-url", written.prom.url, "--out",
                                 str(out), "--config", str(data / "qpq-server.toml"),
                                 "--instance", "flat"])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    doctor = page[page.index('<section id="doctor">'):]
    assert doctor.count("<tr><td>") == len(CHECKS)
    # No server runs on this config: the doctor says so, with its fix.
    assert 'state-critical">critical' in doctor
    assert "pass <code>--config PATH</code>" not in page
