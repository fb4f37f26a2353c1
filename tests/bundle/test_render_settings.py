"""`qpq-ops render --qpq-job/--node-job/--data-mountpoint/--runbook-base-url`: a bundle for
another deployment's scrape jobs, data volume and docs location, still tested by promtool."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qpq_ops.cli import app
from qpq_ops.exit_codes import ExitCode
from qpq_ops.mounts import mountpoint_of
from tests.bundle.conftest import tool

runner = CliRunner()
BASE = "https://git.example.org/ops/qpq/-/blob/main/docs"


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("custom-bundle")
    (root / "pyproject.toml").write_text('[project]\nname = "qpq"\n')
    for artefact in ("alerts", "rules-tests"):
        result = runner.invoke(app, [
            "render", artefact, "--root", str(root), "--qpq-job", "qpq-eu",
            "--node-job", "hosts", "--data-mountpoint", "/srv/qpq",
            "--runbook-base-url", BASE])
        assert result.exit_code == 0, result.output
    return root


def _rules(root: Path) -> list[dict[str, object]]:
    rules = []
    for name in ("prometheus/rules/qpq-recording.yml", "prometheus/alerts/qpq-alerts.yml"):
        doc = yaml.safe_load((root / name).read_text())
        rules += [rule for group in doc["groups"] for rule in group["rules"]]
    return rules


def test_every_series_selector_names_a_configured_job(custom: Path) -> None:
    for rule in _rules(custom):
        expr = str(rule["expr"])
        for selector in re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\{([^}]*)\}", expr):
            if "job" in selector:
                assert re.search(r'job=~?"(qpq-eu|hosts|qpq-eu\|hosts)"', selector), expr
        # raw series (not recorded ones, which carry a colon) always select a job
        for name, selector in re.findall(r"\b([a-z_][a-z0-9_]*)\{([^}]*)\}", expr):
            assert "job=" in selector, (name, expr)
    text = (custom / "prometheus/rules/qpq-recording.yml").read_text()
    assert 'job="qpq"' not in text and 'job="node"' not in text


def test_disk_usage_watches_the_data_mountpoint_and_names_it(custom: Path) -> None:
    rules = {str(r.get("record") or r.get("alert")): r for r in _rules(custom)}
    record = next(r for name, r in rules.items() if name.startswith("instance:qpq_trigger_disk"))
    assert str(record["expr"]).count('mountpoint="/srv/qpq"') == 2
    alert = rules["qpq_disk_usage_critical"]
    assert "/srv/qpq" in alert["annotations"]["summary"]  # type: ignore[index]


def test_runbook_links_are_absolute_under_the_base_url(custom: Path) -> None:
    for rule in _rules(custom):
        if "alert" in rule:
            url = rule["annotations"]["runbook_url"]  # type: ignore[index]
            assert url.startswith(f"{BASE}/operations/incident-response.md#"), url


def test_the_custom_bundle_passes_its_own_promtool_tests(custom: Path) -> None:
    tests = sorted(str(p) for p in (custom / "prometheus/tests").glob("*.yml"))
    result = subprocess.run([tool("promtool"), "test", "rules", *tests],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--runbook-base-url", "docs/operations"], "runbook base URL must be absolute"),
    (["--data-mountpoint", "srv"], "mountpoint must be an absolute path"),
    (["--qpq-job", 'q"pq'], "bad scrape job name"),
])
def test_bad_render_settings_are_usage_errors(tmp_path: Path, args: list[str],
                                              message: str) -> None:
    result = runner.invoke(app, ["render", "alerts", "--root", str(tmp_path), *args])
    assert result.exit_code == ExitCode.USAGE
    assert message in result.stderr
    assert not (tmp_path / "prometheus").exists()


def test_mountpoint_of_matches_df(tmp_path: Path) -> None:
    df = subprocess.run(["df", "--output=target", str(tmp_path)], capture_output=True,
                        text=True, timeout=30, check=True)
    assert str(mountpoint_of(tmp_path)) == df.stdout.splitlines()[-1].strip()
    assert str(mountpoint_of(tmp_path / "not" / "yet")) == df.stdout.splitlines()[-1].strip()
    assert mountpoint_of(Path("/")) == Path("/")


def test_config_gives_the_data_dir_mountpoint(tmp_path: Path) -> None:
    data = tmp_path / "data"
    subprocess.run([str(Path(sys.executable).parent / "qpq-server"), "init", "--data-dir",
                    str(data)], check=True,
                   capture_output=True, timeout=60)
    root = tmp_path / "bundle"
    root.mkdir()
    result = runner.invoke(app, ["render", "alerts", "--root", str(root), "--config",
                                 str(data / "qpq-server.toml")])
    assert result.exit_code == 0, result.output
    text = (root / "prometheus/rules/qpq-recording.yml").read_text()
    assert f'mountpoint="{mountpoint_of(data)}"' in text
    bad = runner.invoke(app, ["render", "alerts", "--root", str(root), "--config",
                              str(tmp_path / "missing.toml")])
    assert bad.exit_code == 64 and "--config" in bad.stderr
